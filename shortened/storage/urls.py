"""Store URLs: ``s3://bucket[/prefix]``, ``file:///abs`` or a path, and the store each opens."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .base import ArtifactStore
from .keys import _norm_prefix
from .local import LocalStore
from .s3 import S3Store

if TYPE_CHECKING:
    from shortened.config import Settings


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
