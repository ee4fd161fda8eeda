"""The abstraction every backend implements, and the helpers built on its primitives."""

from __future__ import annotations

import abc
import builtins
import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactNotFound, IntegrityError
from .files import (
    _CHUNK,
    MANIFEST_NAME,
    _iter_local_files,
    _manifest_entries,
    _staged_dir,
    _tmp_path_next_to,
    _verify_file,
)
from .keys import _join, _norm_prefix, _safe_dest


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class ArtifactStore(abc.ABC):
    """Object store keyed by relative ``/``-separated keys (see module docstring)."""

    url: str

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get_file(self, key: str, dest: Path) -> None:
        """Download to ``dest`` (atomically; parent dirs created). Raises ArtifactNotFound."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raises ArtifactNotFound."""

    def streams_verified(self, size: int) -> bool:
        """Whether ``get_file_verified`` hashes while it downloads an object of ``size``
        bytes (one sequential stream) rather than after (a parallel ranged download)."""
        return True

    def get_file_verified(self, key: str, dest: Path, name: str, size: int, sha256: str) -> None:
        """Download to ``dest`` hashing the bytes as they arrive; ``dest`` appears only if
        size and sha256 match (else IntegrityError naming ``name``)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path_next_to(dest)
        digest = hashlib.sha256()
        written = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in self.open_stream(key, _CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
                    written += len(chunk)
            if written != size:
                raise IntegrityError(name, f"size mismatch: expected {size} bytes, got {written}")
            if digest.hexdigest() != sha256:
                raise IntegrityError(
                    name, f"sha256 mismatch: expected {sha256}, got {digest.hexdigest()}"
                )
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @abc.abstractmethod
    def open_stream(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """Iterator over the object's bytes.

        ArtifactNotFound is raised by this call itself (not lazily on first ``next``), so an
        API handler can map it to 404 before it starts a streaming response.
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        """Objects under ``prefix`` (directory semantics), keys relative to the store root, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; no error if it does not exist."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` ('' = everything)."""

    @abc.abstractmethod
    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A time-limited GET URL (S3), or None when the API must stream the object itself."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise if the store is unreachable / unusable (for /readyz)."""

    # ---- helpers built on the primitives ------------------------------------------------

    def upload_dir(self, local_dir: Path, prefix: str) -> builtins.list[ObjectInfo]:
        """Upload every file under ``local_dir`` to ``prefix/<relative posix path>``. No manifest."""
        prefix = _norm_prefix(prefix)
        out = []
        for name, path in _iter_local_files(Path(local_dir)):
            key = _join(prefix, name)
            self.put_file(key, path)
            out.append(ObjectInfo(key, path.stat().st_size))
        return out

    def download_prefix(
        self, prefix: str, dest: Path, *, verify_manifest: bool = True
    ) -> builtins.list[ObjectInfo]:
        """Download every object under ``prefix`` into ``dest`` keeping relative paths.

        The download goes to a temp dir next to ``dest`` which replaces ``dest`` at the end.
        If ``verify_manifest`` and a ``manifest.json`` is at the top of the prefix, every file it
        lists must be present with the listed size and sha256 (IntegrityError otherwise).
        Raises ArtifactNotFound if the prefix is empty, ValueError for keys that are unsafe or
        would escape ``dest``. Returns the objects, keys relative to ``prefix``.
        """
        prefix = _norm_prefix(prefix)
        strip = len(prefix) + 1 if prefix else 0
        objects = [ObjectInfo(o.key[strip:], o.size) for o in self.list(prefix)]
        if not objects:
            raise ArtifactNotFound(prefix or self.url, f"no objects under {self.url} {prefix!r}")
        dest = Path(dest)
        for o in objects:  # validate everything before writing anything
            _safe_dest(dest, o.key)
        with _staged_dir(dest) as staged:
            for o in objects:
                self.get_file(_join(prefix, o.key), _safe_dest(staged, o.key))
            manifest_path = staged / MANIFEST_NAME
            if verify_manifest and manifest_path.is_file():
                try:
                    manifest = json.loads(manifest_path.read_bytes())
                except ValueError as e:
                    raise IntegrityError(MANIFEST_NAME, f"malformed manifest: {e}") from e
                for entry in _manifest_entries(manifest):
                    p = _safe_dest(staged, entry["name"])
                    if not p.is_file():
                        raise IntegrityError(entry["name"], "listed in the manifest but missing")
                    _verify_file(entry["name"], p, entry["size"], entry["sha256"])
        return objects

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
