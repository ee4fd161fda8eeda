"""An attempt's local directories: its work directory, and the resume directory kept in
the artifact store (:class:`ScratchSync`) so that the next attempt resumes from it, even on
another machine. Work directories of dead workers are swept at the next claim.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from shortened.config import Settings
from shortened.storage.keys import scratch_prefix
from worker.processes import pid_alive

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

log = logging.getLogger(__name__)


def make_work_dir(settings: Settings, job_id: str) -> Path:
    """A fresh work directory for this attempt (named after the job and this process, so
    that a dead process's directory can be told from a live one's)."""
    work_root = settings.data_dir.resolve() / "tmp"
    work_root.mkdir(parents=True, exist_ok=True)
    if swept := sweep_stale_work_dirs(work_root):
        log.info("removed %d work directories left by dead workers", swept)
    return Path(tempfile.mkdtemp(prefix=f"job-{job_id}-p{os.getpid()}-", dir=work_root))


def checkpoint_dir(settings: Settings, job_id: str) -> Path:
    """Per-job Trainer checkpoints, outside the attempt's work dir so that a retried attempt
    on the same machine resumes from them."""
    return settings.data_dir.resolve() / "checkpoints" / job_id


_WORK_DIR = re.compile(r"^job-[0-9a-zA-Z]+-p(\d+)-")


def sweep_stale_work_dirs(work_root: Path) -> int:
    """Remove the work directories of dead processes (a worker SIGKILLed mid-job never ran
    its cleanup); live ones, this process's included, are left alone."""
    removed = 0
    for entry in work_root.iterdir() if work_root.is_dir() else ():
        match = _WORK_DIR.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


class ScratchSync:
    """Keeps the attempt's resume directory (block scores) in the artifact store, so the
    next attempt resumes from it even on another machine."""

    def __init__(self, store: ArtifactStore, job_id: str, local_dir: Path) -> None:
        self.store = store
        self.prefix = scratch_prefix(job_id)
        self.local_dir = local_dir
        self._pushed: dict[str, tuple[int, int]] = {}  # name -> (mtime_ns, size) in the store

    def pull(self) -> int:
        from shortened.storage import ArtifactNotFound

        self.local_dir.mkdir(parents=True, exist_ok=True)
        try:
            objects = self.store.list(self.prefix)
        except Exception as exc:
            log.warning("could not list %s: %s", self.prefix, exc)
            return 0
        count = 0
        for obj in objects:
            name = obj.key[len(self.prefix) + 1 :]
            if "/" in name:
                continue
            with contextlib.suppress(ArtifactNotFound):
                self.store.get_file(obj.key, self.local_dir / name)
                stat = (self.local_dir / name).stat()
                self._pushed[name] = (stat.st_mtime_ns, stat.st_size)
                count += 1
        return count

    def push(self) -> None:
        for path in sorted(self.local_dir.glob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            stat = path.stat()
            version = (stat.st_mtime_ns, stat.st_size)
            if self._pushed.get(path.name) == version:
                continue
            try:
                self.store.put_file(f"{self.prefix}/{path.name}", path)
                self._pushed[path.name] = version
            except Exception as exc:  # resuming is an optimisation: never fail the job for it
                log.warning("could not save %s to the store: %s", path.name, exc)

    def drop(self) -> None:
        try:
            self.store.delete_prefix(self.prefix)
        except Exception as exc:
            log.warning("could not remove %s: %s", self.prefix, exc)
