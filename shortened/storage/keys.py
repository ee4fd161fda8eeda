"""Object keys and prefixes: where each kind of object lives in the store (the layout, the
one place that spells it), and the rules every key obeys (relative, ``/``-separated, never
escaping the store or a destination directory)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

_DRIVE = re.compile(r"^[A-Za-z]:")

# Shared entries of the score and evaluation caches, one ``<prefix>/<key>.json`` each.
SCORE_CACHE_PREFIX = "score-cache"
EVAL_CACHE_PREFIX = "eval-cache"


def job_prefix(job_id: str) -> str:
    """Where a job's outputs are published (complete only once its manifest is there); a
    ``job://<id>/<path>`` source reads ``<path>`` under it."""
    return f"jobs/{job_id}"


def job_key(job_id: str, name: str) -> str:
    """The object of one published file of a job (``name`` as its manifest lists it)."""
    return f"{job_prefix(job_id)}/{name}"


def scratch_prefix(job_id: str) -> str:
    """Where a job's attempts keep state for the next attempt (block scores): never served,
    removed when the job ends."""
    return f"scratch/{job_id}"


def staging_prefix(job_id: str, attempt: int) -> str:
    """Where the training pods of a job's cluster attempt write its output (with a manifest,
    last) for the worker to verify and publish under :func:`job_prefix`; never served,
    removed once published or when the attempt ends."""
    return f"staging/{job_id}/attempt-{attempt}"


def cache_entry_key(prefix: str, key: str, scope: str | None = None) -> str:
    """The object of one cache entry under ``prefix`` (``SCORE_CACHE_PREFIX``,
    ``EVAL_CACHE_PREFIX``), in ``scope``'s part of it when given (see :func:`cache_scope`)."""
    return f"{prefix}/{scope}/{key}.json" if scope else f"{prefix}/{key}.json"


def cache_scope(tenant: str | None) -> str | None:
    """The cache scope of ``tenant`` (None: the global scope): a digest, so that no tenant
    name, whatever its characters, shapes a key, and none can be guessed from a listing."""
    if tenant is None:
        return None
    return "tenant-" + hashlib.sha256(tenant.encode()).hexdigest()[:24]


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
