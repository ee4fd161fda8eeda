"""The output the training pods staged in the artifact store, verified and brought to the
worker's output directory.

Rank 0 publishes its output directory under the attempt's staging prefix with a manifest
written last (``publish_directory``), so a manifest means every file is there. The worker
downloads it verifying each file's size and sha256 against the manifest, reads the report
rank 0 wrote (``report.json``), and publishes the directory as the job's artifacts like any
other job's output; the staging prefix is removed afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.cluster.errors import ClusterTrainingFailed

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

REPORT_NAME = "report.json"


def collect_staged_output(store: ArtifactStore, prefix: str, output_dir: Path) -> dict[str, Any]:
    """Download the staged output into ``output_dir`` (verified) and return its report."""
    from shortened.storage import ArtifactNotFound, IntegrityError, download_published

    try:
        download_published(store, prefix, output_dir)
    except ArtifactNotFound as exc:
        raise ClusterTrainingFailed(
            f"the training completed but published no output under {prefix}/ (no manifest)"
        ) from exc
    except IntegrityError as exc:
        raise ClusterTrainingFailed(f"the staged output under {prefix}/ is damaged: {exc}") from exc
    report_path = output_dir / REPORT_NAME
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as exc:
        raise ClusterTrainingFailed(
            f"the staged output under {prefix}/ has no readable {REPORT_NAME}"
        ) from exc
    if not isinstance(report, dict):
        raise ClusterTrainingFailed(f"{REPORT_NAME} under {prefix}/ is not an object")
    return report
