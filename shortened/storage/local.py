"""The local directory backend."""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shortened.permissions import as_if_created

from .base import ArtifactStore, ObjectInfo
from .errors import ArtifactNotFound
from .files import _CHUNK, _fsync_dir, _tmp_path_next_to
from .keys import _norm_prefix, _safe_dest, check_key


class LocalStore(ArtifactStore):
    """A directory. Temp files live in ``<root>/.staging`` (same filesystem, never listed)."""

    STAGING = ".staging"

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] == self.STAGING:
            raise ValueError(f"key {key!r} uses the reserved name {self.STAGING!r}")
        return _safe_dest(self.root, key)

    def _dir(self, prefix: str) -> Path:
        prefix = _norm_prefix(prefix)
        return self._path(prefix) if prefix else self.root

    def _write_atomic(self, key: str, writer: Any) -> None:
        target = self._path(key)
        staging = self.root / self.STAGING
        staging.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=staging, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            as_if_created(tmp)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(target.parent)

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as src:
            self._write_atomic(key, lambda f: shutil.copyfileobj(src, f, _CHUNK))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomic(key, lambda f: f.write(data))

    def _open(self, key: str) -> Any:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ArtifactNotFound(key) from e

    def get_file(self, key: str, dest: Path) -> None:
        dest = Path(dest)
        with self._open(key) as src:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_path_next_to(dest)
            try:
                with open(tmp, "wb") as f:
                    shutil.copyfileobj(src, f, _CHUNK)
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    def open_stream(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        f = self._open(key)

        def gen() -> Iterator[bytes]:
            with f:
                while chunk := f.read(chunk_size):
                    yield chunk

        return gen()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        base = self._dir(prefix)
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            if Path(dirpath) == self.root and self.STAGING in dirnames:
                dirnames.remove(self.STAGING)
            for fn in filenames:
                p = Path(dirpath) / fn
                with contextlib.suppress(FileNotFoundError):  # deleted concurrently
                    if p.is_file():
                        out.append(
                            ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size)
                        )
        out.sort(key=lambda o: o.key)
        return out

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            path.unlink()
            self._prune_empty_parents(path.parent)

    def delete_prefix(self, prefix: str) -> None:
        base = self._dir(prefix)
        if base == self.root:
            for child in self.root.iterdir():
                if child.name == self.STAGING:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink(missing_ok=True)
            return
        if base.is_dir() and not base.is_symlink():
            shutil.rmtree(base)
            self._prune_empty_parents(base.parent)

    def _prune_empty_parents(self, d: Path) -> None:
        while d != self.root and self.root in d.parents:
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        self._path(key)  # validate anyway
        return None

    def ping(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"artifact directory missing: {self.root}")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"artifact directory not writable: {self.root}")
