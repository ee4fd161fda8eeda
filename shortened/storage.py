"""The one artifact-store abstraction shared by the API, the worker and the engine.

Two backends behind :class:`ArtifactStore`:

* :class:`LocalStore`: a directory. Writes are atomic (temp file in a staging directory
  inside the root, then ``os.replace``), so a reader never sees a half-written object.
* :class:`S3Store`: an S3 bucket (AWS, MinIO, ...) with an optional key prefix, through
  boto3. Large files go through boto3's managed transfer (multipart, concurrent parts).

Keys are relative, ``/``-separated strings. Every key and prefix is checked: ``..`` / ``.``
/ empty components, backslashes, NUL and absolute keys raise :class:`ValueError`, and object
keys read back from a bucket are checked the same way before anything is written locally.

Prefixes have *directory* semantics: ``list("jobs/1")`` returns the objects under
``jobs/1/`` and never ``jobs/10/...``. The empty prefix means the whole store.

Published outputs (:func:`publish_directory`) carry a ``manifest.json`` written last, listing
each file's size and sha256; :func:`download_published` only accepts a prefix with a manifest
and verifies every file against it.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from shortened.config import Settings

__all__ = [
    "MANIFEST_NAME",
    "ArtifactNotFound",
    "ArtifactStore",
    "IntegrityError",
    "LocalStore",
    "ObjectInfo",
    "S3Store",
    "check_key",
    "download_published",
    "download_uri",
    "open_store",
    "publish_directory",
    "read_manifest",
    "sha256_file",
    "store_from_settings",
]

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
_MiB = 1 << 20


class ArtifactNotFound(Exception):
    """The object (or published output) does not exist."""

    def __init__(self, key: str, message: str | None = None) -> None:
        super().__init__(message or f"artifact not found: {key}")
        self.key = key

    def __reduce__(self) -> Any:  # picklable (Celery result backends)
        return (type(self), (self.key, str(self)))


class IntegrityError(Exception):
    """A downloaded file does not match its manifest entry (size or sha256)."""

    def __init__(self, name: str, message: str = "integrity check failed") -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.detail = message

    def __reduce__(self) -> Any:  # picklable (Celery result backends)
        return (type(self), (self.name, self.detail))


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


# --------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:")


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("empty key")
    if "\x00" in key:
        raise ValueError(f"key contains NUL: {key!r}")
    if "\\" in key:
        raise ValueError(f"key contains a backslash: {key!r}")
    if key.startswith("/") or _DRIVE.match(key):
        raise ValueError(f"absolute key: {key!r}")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"unsafe key {key!r}: empty, '.' or '..' component")
    return key


def _norm_prefix(prefix: str) -> str:
    """Directory-like prefix without trailing slash; '' is the store root."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if prefix == "":
        return ""
    if prefix.startswith("/"):
        raise ValueError(f"absolute prefix: {prefix!r}")
    if prefix.endswith("/"):
        prefix = prefix[:-1]
    return check_key(prefix)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _safe_dest(dest: Path, key: str) -> Path:
    """Local path for ``key`` under ``dest``; rejects keys that would escape it."""
    check_key(key)
    target = dest.joinpath(*key.split("/"))
    root = os.path.realpath(dest)
    real = os.path.realpath(target)
    if os.path.commonpath([root, real]) != root or real == root:
        raise ValueError(f"key {key!r} escapes destination {dest}")
    return target


# --------------------------------------------------------------------------------------
# hashing / local file helpers
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# the abstraction
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# local directory backend
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# S3 backend
# --------------------------------------------------------------------------------------

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


def _is_not_found(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    return (
        isinstance(err, ClientError)
        and str(err.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES
    )


class S3Store(ArtifactStore):
    """An S3 bucket with an optional key prefix.

    ``endpoint_url`` selects an S3-compatible server (MinIO, ...) and switches to path-style
    addressing. Credentials come from the standard boto3 chain (env vars, files, IAM role).
    ``transfer_config`` tunes the managed transfers (multipart threshold/chunk size, concurrency).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        transfer_config: Any = None,
        client: Any = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket or "/" in bucket:
            raise ValueError(f"invalid bucket name: {bucket!r}")
        self.bucket = bucket
        self.prefix = _norm_prefix(prefix)
        self.endpoint_url = endpoint_url or None
        self.region = region
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.transfer_config = transfer_config or TransferConfig(
            multipart_threshold=64 * _MiB,
            multipart_chunksize=64 * _MiB,
            max_concurrency=8,
            use_threads=True,
        )
        s3_cfg = {"addressing_style": "path"} if self.endpoint_url else {}
        self._session = boto3.session.Session(region_name=region)
        self._config = Config(
            region_name=region,
            signature_version="s3v4",
            s3=s3_cfg,
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=max(10, getattr(self.transfer_config, "max_concurrency", 10) + 2),
        )
        self.client = client or self._session.client(
            "s3", endpoint_url=self.endpoint_url, config=self._config
        )
        self._ping_client: Any = None

    def _key(self, key: str) -> str:
        return _join(self.prefix, check_key(key))

    def _list_prefix(self, prefix: str) -> str:
        full = _join(self.prefix, _norm_prefix(prefix)) if prefix else self.prefix
        return f"{full}/" if full else ""

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer_config)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_file(self, key: str, dest: Path) -> None:
        full = self._key(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path_next_to(dest)
        try:
            self.client.download_file(self.bucket, full, str(tmp), Config=self.transfer_config)
            os.replace(tmp, dest)
        except Exception as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if _is_not_found(e):
                raise ArtifactNotFound(key) from e
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def streams_verified(self, size: int) -> bool:
        # Below the multipart threshold boto3 would use one GET too: stream it and hash on
        # the way. Above it, its parallel ranged GETs are faster and the hash comes after.
        return size < getattr(self.transfer_config, "multipart_threshold", 8 * _MiB)

    def _get_object(self, key: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if _is_not_found(e):
                raise ArtifactNotFound(key) from e
            raise

    def get_bytes(self, key: str) -> bytes:
        body = self._get_object(key)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def open_stream(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        body = self._get_object(key)["Body"]

        def gen() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

        return gen()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if _is_not_found(e):
                return False
            raise
        return True

    def _iter_raw(self, full_prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            yield from page.get("Contents", [])

    def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        full_prefix = self._list_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = [
            ObjectInfo(obj["Key"][strip:], int(obj["Size"]))
            for obj in self._iter_raw(full_prefix)
            if not obj["Key"].endswith("/")  # "folder" marker objects
        ]
        out.sort(key=lambda o: o.key)
        return out

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = [obj["Key"] for obj in self._iter_raw(self._list_prefix(prefix))]
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            resp = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(
                    f"failed to delete {len(errors)} object(s) under {self.url}/{prefix}: "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=int(expires_s),
        )

    def ping(self) -> None:
        if self._ping_client is None:
            from botocore.config import Config

            cfg = self._config.merge(
                Config(
                    connect_timeout=3,
                    read_timeout=5,
                    retries={"max_attempts": 1, "mode": "standard"},
                )
            )
            self._ping_client = self._session.client(
                "s3", endpoint_url=self.endpoint_url, config=cfg
            )
        self._ping_client.head_bucket(Bucket=self.bucket)


# --------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------


def _parse_s3_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"not an s3:// URL: {url!r}")
    if not parts.netloc:
        raise ValueError(f"s3 URL without a bucket: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"s3 URL must not have a query or fragment: {url!r}")
    prefix = parts.path.lstrip("/")
    return parts.netloc, _norm_prefix(prefix) if prefix else ""


def _parse_local_url(url: str) -> Path:
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URL must be absolute (file:///path): {url!r}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"file:// URL must be absolute (file:///path): {url!r}")
        return Path(path)
    if "://" in url:
        raise ValueError(f"unsupported store URL scheme: {url!r} (use file://, s3:// or a path)")
    if not url:
        raise ValueError("empty store URL")
    return Path(url)


def open_store(
    url: str, *, s3_endpoint_url: str | None = None, s3_region: str = "us-east-1"
) -> ArtifactStore:
    """``file:///abs``, ``/abs/path`` or ``relative/path`` -> LocalStore; ``s3://bucket[/prefix]`` -> S3Store."""
    url = str(url).strip()
    if url.startswith("s3://"):
        bucket, prefix = _parse_s3_url(url)
        return S3Store(bucket, prefix, endpoint_url=s3_endpoint_url or None, region=s3_region)
    return LocalStore(_parse_local_url(url))


def store_from_settings(settings: Settings | None = None) -> ArtifactStore:
    if settings is None:
        from shortened.config import get_settings

        settings = get_settings()
    return open_store(
        settings.resolved_artifacts_url,
        s3_endpoint_url=settings.s3_endpoint_url or None,
        s3_region=settings.s3_region,
    )


# --------------------------------------------------------------------------------------
# published outputs
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# model directories under a prefix (schedules: "the newest model under s3://.../models/")
# --------------------------------------------------------------------------------------

MODEL_CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ModelDir:
    """A model directory directly under a prefix: ``uri`` (``s3://bucket/key/`` or a local
    path) and ``modified``, the newest LastModified / mtime of anything inside it."""

    uri: str
    modified: datetime


def list_model_dirs(
    prefix_uri: str, *, s3_endpoint_url: str | None = None, s3_region: str = "us-east-1"
) -> builtins.list[ModelDir]:
    """The model directories directly under ``prefix_uri`` (``s3://bucket/prefix/``,
    ``file:///dir`` or a directory path): every child directory holding a ``config.json``,
    newest first. A directory counts once its ``config.json`` exists, so an uploader that
    writes ``config.json`` last never exposes a half-uploaded model."""
    prefix_uri = str(prefix_uri).strip()
    found: dict[str, datetime] = {}
    has_config: set[str] = set()
    if prefix_uri.startswith("s3://"):
        bucket, prefix = _parse_s3_url(prefix_uri)
        store = S3Store(bucket, prefix, endpoint_url=s3_endpoint_url, region=s3_region)
        base = f"{store.prefix}/" if store.prefix else ""
        for obj in store._iter_raw(base):
            child, sep, rest = obj["Key"][len(base) :].partition("/")
            if not sep or not rest or rest.endswith("/"):
                continue
            modified = obj["LastModified"]
            if child not in found or modified > found[child]:
                found[child] = modified
            if rest == MODEL_CONFIG_NAME:
                has_config.add(child)
        dirs = [ModelDir(f"s3://{bucket}/{base}{child}/", found[child]) for child in has_config]
    else:
        root = _parse_local_url(prefix_uri)
        dirs = []
        if root.is_dir():
            for child in root.iterdir():
                if child.name.startswith(".") or not (child / MODEL_CONFIG_NAME).is_file():
                    continue
                newest = 0.0
                for dirpath, _dirnames, filenames in os.walk(child):
                    for fn in filenames:
                        with contextlib.suppress(FileNotFoundError):
                            newest = max(newest, os.stat(Path(dirpath) / fn).st_mtime)
                dirs.append(ModelDir(str(child), datetime.fromtimestamp(newest, timezone.utc)))
    dirs.sort(key=lambda d: (d.modified, d.uri), reverse=True)
    return dirs


def newest_model_dir(
    prefix_uri: str, *, s3_endpoint_url: str | None = None, s3_region: str = "us-east-1"
) -> ModelDir:
    """The most recently modified model directory under ``prefix_uri``; ArtifactNotFound
    when there is none."""
    dirs = list_model_dirs(prefix_uri, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)
    if not dirs:
        raise ArtifactNotFound(
            prefix_uri,
            f"no model directory (a folder holding {MODEL_CONFIG_NAME}) under {prefix_uri}",
        )
    return dirs[0]
