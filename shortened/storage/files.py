"""Local files on either side of a transfer: hashing, atomic staging, and checking files
against a manifest."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shortened.permissions import as_if_created

from .errors import IntegrityError
from .keys import check_key

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _iter_local_files(local_dir: Path) -> list[tuple[str, Path]]:
    """(posix relative name, path) of every regular file under local_dir, sorted.

    Follows symlinks (Hugging Face snapshot directories are symlinks into a blob store),
    guarding against directory cycles.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise NotADirectoryError(f"not a directory: {local_dir}")
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(local_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for fn in filenames:
            p = Path(dirpath) / fn
            if not p.is_file():  # broken symlink, socket, ...
                continue
            rel = p.relative_to(local_dir).as_posix()
            out.append((check_key(rel), p))
    out.sort()
    return out


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_path_next_to(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.{uuid.uuid4().hex}.partial"


def _swap_into(staged: Path, dest: Path) -> None:
    """Rename staged (a complete directory) to dest, replacing whatever dest was."""
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.old"
        os.rename(dest, old)
    try:
        os.rename(staged, dest)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                os.rename(old, dest)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                old.unlink()


@contextlib.contextmanager
def _staged_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temp dir next to dest; on success it atomically becomes dest."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield staged
        as_if_created(staged)
        _swap_into(staged, dest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _verify_file(name: str, path: Path, size: int, sha256: str) -> None:
    actual_size = path.stat().st_size
    if actual_size != size:
        raise IntegrityError(name, f"size mismatch: expected {size} bytes, got {actual_size}")
    actual = sha256_file(path)
    if actual != sha256:
        raise IntegrityError(name, f"sha256 mismatch: expected {sha256}, got {actual}")


def _manifest_entries(manifest: Any) -> list[dict[str, Any]]:
    """Validate a manifest's structure and names; return its file entries."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise IntegrityError(MANIFEST_NAME, "malformed manifest: no 'files' list")
    entries = manifest["files"]
    for e in entries:
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("name"), str)
            or not isinstance(e.get("size"), int)
            or not isinstance(e.get("sha256"), str)
        ):
            raise IntegrityError(MANIFEST_NAME, f"malformed manifest entry: {e!r}")
        check_key(e["name"])
    return entries
