"""Publishing a job's output: upload the directory with its manifest, then check that the
store holds exactly what was uploaded before the job may succeed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortened.engine.errors import storage_errors

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore


class PublishError(Exception):
    """The store does not hold what was uploaded (missing object, wrong size)."""


def publish(
    store: ArtifactStore, output_dir: Path, prefix: str, job_id: str, kind: str
) -> list[dict[str, Any]]:
    """Upload ``output_dir`` under ``prefix`` with its manifest (written last), verify it,
    and return the artifacts' name, size and sha256."""
    from shortened.storage import publish_directory

    with storage_errors("publishing the outputs"):
        manifest = publish_directory(
            store, output_dir, prefix, extra={"job_id": job_id, "kind": kind}
        )
        verify_published(store, prefix, manifest)
    return [
        {"name": f["name"], "size": f["size"], "sha256": f["sha256"]} for f in manifest["files"]
    ]


def verify_published(store: ArtifactStore, prefix: str, manifest: dict[str, Any]) -> None:
    """Every file of the manifest is in the store with its size, and so is the manifest."""
    from shortened.storage import MANIFEST_NAME, read_manifest

    present = {obj.key: obj.size for obj in store.list(prefix)}
    for entry in manifest["files"]:
        key = f"{prefix}/{entry['name']}"
        if present.get(key) != entry["size"]:
            raise PublishError(
                f"{entry['name']}: expected {entry['size']} bytes in the store, "
                f"found {present.get(key, 'nothing')}"
            )
    stored = read_manifest(store, prefix)
    if stored is None or stored.get("files") != manifest["files"]:
        raise PublishError(f"{MANIFEST_NAME} in the store does not match what was uploaded")
