"""Block scores saved as they are computed, so that a retried run skips the blocks already
scored (a worker lost half-way through a long perplexity scoring loses no finished block).

One JSON file holds the scores of one run identity (model, calibration fingerprint,
criterion, ...); a file written for another identity is ignored and replaced. Within it,
scores are grouped by *scope*: the set of active blocks they were measured on (one scope for
``ppl``, one per round for ``iterative_ppl``). The file is rewritten atomically after every
block, so a crash leaves either the previous or the new version. Without a path the
checkpoint lives in memory only (it still collects scores for the score cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CHECKPOINT_NAME = "block_scores.partial.json"


def checkpoint_key(**identity: Any) -> str:
    """A stable hash of everything the saved scores depend on."""
    canonical = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class ScoreCheckpoint:
    def __init__(self, path: Path | None, key: str) -> None:
        self.path = Path(path) if path is not None else None
        self.key = key
        self._data: dict[str, Any] = {"key": key, "scopes": {}}
        try:
            loaded = json.loads(self.path.read_text()) if self.path is not None else None
        except (OSError, ValueError):
            loaded = None
        if (
            isinstance(loaded, dict)
            and loaded.get("key") == key
            and isinstance(loaded.get("scopes"), dict)
        ):
            self._data = loaded
        #: how many block scores were loaded from a previous run
        self.resumed = sum(len(scope.get("scores", {})) for scope in self._data["scopes"].values())

    @property
    def scopes(self) -> dict[str, Any]:
        return self._data["scopes"]

    def merge(self, scopes: dict[str, Any]) -> int:
        """Add scores (and baselines) this checkpoint lacks; returns how many scores."""
        added = 0
        for scope, entry in scopes.items():
            target = self._scope(scope)
            for block, score in entry.get("scores", {}).items():
                if block not in target["scores"]:
                    target["scores"][block] = float(score)
                    added += 1
            if target["baseline"] is None and entry.get("baseline") is not None:
                target["baseline"] = float(entry["baseline"])
        if added:
            self._write()
        return added

    @staticmethod
    def scope_of(active: list[int]) -> str:
        return ",".join(map(str, active))

    def _scope(self, scope: str) -> dict[str, Any]:
        return self._data["scopes"].setdefault(scope, {"scores": {}, "baseline": None})

    def scores(self, scope: str) -> dict[int, float]:
        saved = self._data["scopes"].get(scope, {}).get("scores", {})
        return {int(block): float(score) for block, score in saved.items()}

    def baseline(self, scope: str) -> float | None:
        value = self._data["scopes"].get(scope, {}).get("baseline")
        return None if value is None else float(value)

    def save_score(self, scope: str, block: int, score: float) -> None:
        self._scope(scope)["scores"][str(block)] = score
        self._write()

    def save_baseline(self, scope: str, baseline: float) -> None:
        self._scope(scope)["baseline"] = baseline
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(self._data, handle)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
