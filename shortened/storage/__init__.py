"""The one artifact-store abstraction shared by the API, the worker and the engine.

Two backends behind :class:`ArtifactStore` (``base.py``):

* :class:`LocalStore` (``local.py``): a directory. Writes are atomic (temp file in a staging
  directory inside the root, then ``os.replace``), so a reader never sees a half-written object.
* :class:`S3Store` (``s3.py``): an S3 bucket (AWS, MinIO, ...) with an optional key prefix,
  through boto3. Large files go through boto3's managed transfer (multipart, concurrent parts).

Keys are relative, ``/``-separated strings; ``keys.py`` also holds the store's layout
(``job_prefix``, ``scratch_prefix``, the cache prefixes). Every key and prefix is checked:
``..`` / ``.`` / empty components, backslashes, NUL and absolute keys raise :class:`ValueError`,
and object keys read back from a bucket are checked the same way before anything is written
locally.

Prefixes have *directory* semantics: ``list("jobs/1")`` returns the objects under
``jobs/1/`` and never ``jobs/10/...``. The empty prefix means the whole store.

Published outputs (:func:`publish_directory`, ``publish.py``) carry a ``manifest.json`` written
last, listing each file's size and sha256; :func:`download_published` only accepts a prefix
with a manifest and verifies every file against it. ``model_dirs.py`` finds the newest model
directory under a prefix (schedules).
"""

from __future__ import annotations

from .base import ArtifactStore, ObjectInfo
from .errors import ArtifactNotFound, IntegrityError
from .files import MANIFEST_NAME, sha256_file
from .keys import (
    EVAL_CACHE_PREFIX,
    SCORE_CACHE_PREFIX,
    cache_entry_key,
    check_key,
    job_key,
    job_prefix,
    scratch_prefix,
)
from .local import LocalStore
from .model_dirs import MODEL_CONFIG_NAME, ModelDir, list_model_dirs, newest_model_dir
from .publish import download_published, download_uri, publish_directory, read_manifest
from .s3 import S3Store
from .urls import open_store, store_from_settings

__all__ = [
    "EVAL_CACHE_PREFIX",
    "MANIFEST_NAME",
    "MODEL_CONFIG_NAME",
    "ArtifactNotFound",
    "ArtifactStore",
    "IntegrityError",
    "LocalStore",
    "ModelDir",
    "ObjectInfo",
    "S3Store",
    "SCORE_CACHE_PREFIX",
    "cache_entry_key",
    "check_key",
    "download_published",
    "download_uri",
    "job_key",
    "job_prefix",
    "list_model_dirs",
    "newest_model_dir",
    "open_store",
    "publish_directory",
    "read_manifest",
    "scratch_prefix",
    "sha256_file",
    "store_from_settings",
]
