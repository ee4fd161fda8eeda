"""Published outputs: a prefix whose ``manifest.json``, written last, lists every file's size
and sha256; downloads verify every file against it."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from .base import ArtifactStore
from .errors import ArtifactNotFound, IntegrityError
from .files import (
    MANIFEST_NAME,
    _iter_local_files,
    _manifest_entries,
    _staged_dir,
    _verify_file,
    sha256_file,
)
from .keys import _join, _norm_prefix, _safe_dest
from .local import LocalStore
from .s3 import S3Store
from .urls import _parse_local_url, _parse_s3_url

_RESERVED_MANIFEST_KEYS = ("files", "created_at")


def publish_directory(
    store: ArtifactStore, local_dir: Path, prefix: str, *, extra: dict | None = None
) -> dict:
    """Upload ``local_dir`` to ``prefix`` and write ``prefix/manifest.json`` last.

    Stale objects under ``prefix`` (a previous failed attempt) are removed first, the old
    manifest before anything else, so a manifest is only ever present when every file it
    lists is present. A top-level ``manifest.json`` inside ``local_dir`` is not uploaded (it
    would be replaced). ``extra`` keys are merged into the manifest; ``files`` and
    ``created_at`` are reserved. Returns the manifest.
    """
    prefix = _norm_prefix(prefix)
    if not prefix:
        raise ValueError("publish_directory needs a non-empty prefix")
    extra = dict(extra or {})
    clash = [k for k in _RESERVED_MANIFEST_KEYS if k in extra]
    if clash:
        raise ValueError(f"reserved manifest keys in extra: {clash}")
    files = [(n, p) for n, p in _iter_local_files(Path(local_dir)) if n != MANIFEST_NAME]

    manifest_key = _join(prefix, MANIFEST_NAME)
    store.delete(manifest_key)
    store.delete_prefix(prefix)

    # Hash on a thread while the uploads run (hashlib and the socket writes both release
    # the GIL): the manifest needs the digests only at the end.
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
        digests = [hasher.submit(sha256_file, path) for _, path in files]
        sizes = [path.stat().st_size for _, path in files]
        for name, path in files:
            store.put_file(_join(prefix, name), path)
        entries = [
            {"name": name, "size": size, "sha256": digest.result()}
            for (name, _), size, digest in zip(files, sizes, digests, strict=True)
        ]

    manifest = {
        "files": entries,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    store.put_bytes(manifest_key, json.dumps(manifest, indent=2).encode())
    return manifest


def read_manifest(store: ArtifactStore, prefix: str) -> dict | None:
    """The manifest at ``prefix``, or None when the output is not (completely) published."""
    prefix = _norm_prefix(prefix)
    try:
        raw = store.get_bytes(_join(prefix, MANIFEST_NAME))
    except ArtifactNotFound:
        return None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise IntegrityError(MANIFEST_NAME, f"malformed manifest at {prefix!r}: {e}") from e
    _manifest_entries(manifest)
    return manifest


def download_published(store: ArtifactStore, prefix: str, dest: Path) -> dict:
    """Download a published output into ``dest`` (replacing it), verifying size + sha256.

    Raises ArtifactNotFound without a manifest, IntegrityError (naming the file) on mismatch.
    The files go to a temp dir next to ``dest`` that is renamed into place only when all are
    verified. ``manifest.json`` itself is not written to ``dest``. Returns the manifest.
    """
    prefix = _norm_prefix(prefix)
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise ArtifactNotFound(
            _join(prefix, MANIFEST_NAME),
            f"no published output at {store.url} {prefix!r} (no manifest)",
        )
    entries = _manifest_entries(manifest)
    dest = Path(dest)
    for e in entries:
        _safe_dest(dest, e["name"])
    with (
        _staged_dir(dest) as staged,
        ThreadPoolExecutor(1, thread_name_prefix="verify") as verifier,
    ):
        verifications = []
        for e in entries:
            target = _safe_dest(staged, e["name"])
            key = _join(prefix, e["name"])
            try:
                if store.streams_verified(e["size"]):  # hashed as it arrives
                    store.get_file_verified(key, target, e["name"], e["size"], e["sha256"])
                    continue
                store.get_file(key, target)
            except ArtifactNotFound as err:
                raise IntegrityError(e["name"], "listed in the manifest but missing") from err
            # A large object (parallel ranged download): hash file i while file i+1
            # downloads (hashlib releases the GIL on large reads).
            verifications.append(
                verifier.submit(_verify_file, e["name"], target, e["size"], e["sha256"])
            )
        for verification in verifications:
            verification.result()  # raises IntegrityError before the staged dir is moved into place
    return manifest


def download_uri(
    uri: str, dest: Path, *, s3_endpoint_url: str | None = None, s3_region: str = "us-east-1"
) -> Path:
    """Download everything under ``uri`` (``s3://bucket/prefix/``, ``file:///dir`` or a dir path)
    into ``dest``, keeping relative paths; verified against a top-level ``manifest.json`` if any.

    Returns ``dest``. If ``uri`` names a single object rather than a prefix (e.g.
    ``s3://bucket/calib.jsonl``), it is downloaded to ``dest/<basename>`` and that path is
    returned. Raises ArtifactNotFound if there is nothing there.
    """
    dest = Path(dest)
    uri = str(uri).strip()
    if uri.startswith("s3://"):
        bucket, prefix = _parse_s3_url(uri)
        store = S3Store(bucket, prefix, endpoint_url=s3_endpoint_url, region=s3_region)
        try:
            store.download_prefix("", dest)
            return dest
        except ArtifactNotFound:
            if not prefix or uri.endswith("/"):
                raise
        parent, _, base = prefix.rpartition("/")
        single = S3Store(
            bucket, parent, endpoint_url=s3_endpoint_url, region=s3_region, client=store.client
        )
        target = dest / base
        try:
            single.get_file(base, target)
        except ArtifactNotFound as e:
            raise ArtifactNotFound(uri, f"nothing at {uri}") from e
        return target

    path = _parse_local_url(uri)
    if path.is_file():
        target = dest / path.name
        LocalStore(path.parent, create=False).get_file(path.name, target)
        return target
    if not path.is_dir():
        raise ArtifactNotFound(uri)
    LocalStore(path, create=False).download_prefix("", dest)
    return dest
