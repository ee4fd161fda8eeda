"""Model directories under a prefix (schedules: \"the newest model under s3://.../models/\")."""

from __future__ import annotations

import builtins
import contextlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import ArtifactNotFound
from .s3 import S3Store
from .urls import _parse_local_url, _parse_s3_url

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
