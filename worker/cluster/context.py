"""What a cluster run needs of the attempt that starts it.

The worker's ``EngineContext`` has these attributes; a protocol here, rather than an import of
it, keeps ``worker.engine_call`` (which routes to this package) out of this package's imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shortened.config import Settings
    from shortened.storage import ArtifactStore
    from worker.reporter import JobReporter


class RunContext(Protocol):
    @property
    def job_id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def output_dir(self) -> Path: ...
    @property
    def reporter(self) -> JobReporter: ...
    @property
    def store(self) -> ArtifactStore: ...
    @property
    def settings(self) -> Settings: ...
