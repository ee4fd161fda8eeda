"""Serving a succeeded job's published files: the manifest in the store checked against the
files recorded when the job succeeded, download links (presigned, or a path on the API), and
one file fetched, verified (size and sha256) and streamed.

A mismatch is a 502 ``artifact_corrupted`` and an unreachable store a 503
``storage_unavailable`` (``service.errors.APIError``); never a download of unverified bytes.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from service.errors import APIError
from service.models import Job
from service.schemas.jobs import ArtifactLink
from shortened.storage import (
    ArtifactNotFound,
    ArtifactStore,
    IntegrityError,
    job_key,
    job_prefix,
    read_manifest,
)

log = logging.getLogger(__name__)

Entry = dict[str, Any]  # a published file: name, size, sha256


def _verified_entries(job: Job, manifest: dict[str, Any]) -> list[Entry]:
    """The job's files as recorded in the job store when it succeeded; the manifest in the
    store must agree, or the published output has been tampered with or damaged."""
    recorded = job.artifacts if job.artifacts is not None else manifest.get("files", [])

    def as_set(entries: list[Entry]) -> set[tuple[str, int, str]]:
        return {(e["name"], e["size"], e["sha256"]) for e in entries}

    if as_set(manifest["files"]) != as_set(recorded):
        raise APIError(
            502,
            "artifact_corrupted",
            f"the published manifest of job {job.id} does not match the files recorded "
            "when it succeeded",
        )
    return [{"name": e["name"], "size": e["size"], "sha256": e["sha256"]} for e in recorded]


def published_files(store: ArtifactStore, job: Job) -> list[Entry] | None:
    """The succeeded ``job``'s published files, verified against its record; None when it
    has no published output (no manifest)."""
    try:
        manifest = read_manifest(store, job_prefix(job.id))
    except IntegrityError as exc:
        raise APIError(502, "artifact_corrupted", f"job {job.id}: {exc}") from exc
    except Exception as exc:
        raise APIError(503, "storage_unavailable", f"artifact store error: {exc}") from exc
    if manifest is None:
        return None
    return _verified_entries(job, manifest)


def download_links(
    store: ArtifactStore, job: Job, files: list[Entry], root_path: str, expiry_s: int
) -> list[ArtifactLink]:
    """A link per file: a presigned object-store URL, or (local store) the API path that
    streams it after verifying it."""
    links = []
    for entry in files:
        url = store.presigned_url(job_key(job.id, entry["name"]), expiry_s)
        if url is None:
            url = f"{root_path}/jobs/{job.id}/artifacts/{quote(entry['name'], safe='/')}"
        links.append(
            ArtifactLink(name=entry["name"], size=entry["size"], sha256=entry["sha256"], url=url)
        )
    return links


def open_verified(store: ArtifactStore, spool: Path, job: Job, entry: Entry) -> BinaryIO:
    """The file, downloaded into ``spool`` and checked against its size and sha256, open for
    reading (already unlinked: the handle keeps the data until it is closed)."""
    name = entry["name"]
    spool.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{job.id}-", dir=spool)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            # Hashed while it downloads; the file appears only if size and sha256 match.
            store.get_file_verified(
                job_key(job.id, name), tmp, name, entry["size"], entry["sha256"]
            )
        except ArtifactNotFound as exc:
            raise APIError(
                502, "artifact_corrupted", f"artifact {name!r} is listed but missing from the store"
            ) from exc
        except IntegrityError as exc:
            log.error("job %s artifact %s does not match its sha256/size: %s", job.id, name, exc)
            raise APIError(
                502,
                "artifact_corrupted",
                f"artifact {name!r} of job {job.id} does not match its recorded sha256 and size",
            ) from exc
        except Exception as exc:
            raise APIError(503, "storage_unavailable", f"artifact store error: {exc}") from exc
        return tmp.open("rb")
    finally:
        tmp.unlink(missing_ok=True)


def stream(handle: BinaryIO, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The open file in chunks, closed at the end (or when the response is abandoned)."""
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk


def download_headers(entry: Entry) -> dict[str, str]:
    filename = quote(entry["name"].rsplit("/", 1)[-1])
    return {
        "Content-Length": str(entry["size"]),
        "ETag": f'"{entry["sha256"]}"',
        "Content-Disposition": f"attachment; filename*=UTF-8''{filename}",
    }
