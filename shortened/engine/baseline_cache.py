"""A parent model's evaluation results, computed once and reused.

Every eval step of a batch grid compares its pruned model with the same unpruned parent, and
so does every repeated evaluation of one model: the parent's perplexity, accuracy and speed
are the same each time. They are kept like block scores (``score_cache.py``: a directory for
the CLI, the artifact store for workers), keyed by what they depend on: the parent's content, the evaluation sections, the evaluation
texts, dtype, device and library versions; and, when speed is measured, the machine (a
latency measured on one host says nothing about another).
"""

from __future__ import annotations

import hashlib
import platform
import re
from pathlib import Path
from typing import Any

from shortened.specs import EvalSpec
from shortened.storage.keys import EVAL_CACHE_PREFIX

from .checkpoint import checkpoint_key
from .score_cache import DirectoryScoreCache, ScoreCache, StoreScoreCache, model_fingerprint

BASELINE_VERSION = "eval-baseline/v1"


class _BaselineEntries(ScoreCache):
    VERSION = BASELINE_VERSION
    PREFIX = EVAL_CACHE_PREFIX

    def save(self, key: str, entry: dict[str, Any]) -> None:
        self._write(key, entry)  # a whole result: nothing to merge


class DirectoryBaselineCache(_BaselineEntries, DirectoryScoreCache):
    """Entries as ``<dir>/<key>.json`` (the CLI's ``--baseline-cache DIR``)."""


class StoreBaselineCache(_BaselineEntries, StoreScoreCache):
    """Entries as ``eval-cache/<key>.json`` in the artifact store, shared by all workers."""


def baseline_fingerprint(
    path_or_id: str, revision: str | None, memo_path: Path | None = None
) -> str | None:
    """The parent's identity without loading it: the content hash of a local directory, the
    commit of a hub model pinned to one; None (no reuse) for a moving hub revision."""
    if Path(path_or_id).is_dir():
        return model_fingerprint(path_or_id, revision, None, memo_path)
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return f"hf:{path_or_id}@{revision}"
    return None


def text_fingerprint(texts: list[Any]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(f"{text.name}\0{len(text.text)}\0".encode())
        digest.update(text.text.encode())
    return digest.hexdigest()


def baseline_key(
    *, model: str, spec: EvalSpec, texts: str, versions: dict[str, Any], device_name: str
) -> str:
    sections = spec.model_dump(
        mode="json", include={"perplexity", "zero_shot", "efficiency", "dtype", "device"}
    )
    identity: dict[str, Any] = {
        "version": BASELINE_VERSION,
        "model": model,
        "sections": sections,
        "texts": texts,
        "libraries": versions,
        "device": device_name,
    }
    if spec.efficiency is not None:
        identity["host"] = platform.node()
    return checkpoint_key(**identity)
