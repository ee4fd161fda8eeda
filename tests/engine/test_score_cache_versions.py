"""Score cache keys carry the sampling version and the criterion definition version: scores
cached under an earlier definition (or by the earlier key, which had neither) are never reused
as if they were the current ones."""

from __future__ import annotations

import json

import pytest

import shortened.engine.prune as prune_module
from shortened.engine.calibration import SAMPLING_VERSIONS
from shortened.engine.checkpoint import checkpoint_key
from shortened.engine.criteria import CRITERIA as CRITERION_FUNCTIONS
from shortened.engine.criteria import CRITERION_VERSIONS
from shortened.engine.prune import prune_model
from shortened.engine.score_cache import CACHE_VERSION, DirectoryScoreCache, cache_key
from shortened.specs import CRITERIA, CalibrationSpec, PruneSpec
from tests.helpers import CALIBRATION, TINY_MODEL

IDENTITY = {
    "model": "sha256:abc",
    "criterion": "taylor",
    "criterion_version": 2,
    "calibration": "0123456789abcdef",
    "sampling": "paper/1",
    "dtype": "torch.float32",
    "device_type": "cpu",
    "num_layers": 12,
    "candidates": [1, 2, 3],
    "num_blocks": 2,
}


def test_every_criterion_and_sampling_has_a_version():
    assert set(CRITERION_VERSIONS) == set(CRITERION_FUNCTIONS) == set(CRITERIA)
    assert set(SAMPLING_VERSIONS) == {"paper", "shuffle"}


@pytest.mark.parametrize(("field", "other"), [("criterion_version", 1), ("sampling", "shuffle/1")])
def test_key_changes_with_each_version(field, other):
    assert cache_key(**IDENTITY) != cache_key(**{**IDENTITY, field: other})


def spec(criterion: str) -> PruneSpec:
    return PruneSpec(
        model=str(TINY_MODEL),
        criterion=criterion,
        num_blocks=2,
        protect_first=1,
        protect_last=1,
        calibration=CalibrationSpec(source=str(CALIBRATION), n_samples=4, seq_len=32),
        device="cpu",
        dtype="float32",
    )


def test_scores_of_an_older_definition_are_not_reused(tmp_path, monkeypatch):
    cache = DirectoryScoreCache(tmp_path / "scores")
    first = prune_model(spec("magnitude"), tmp_path / "a", score_cache=cache)
    assert first["criterion_version"] == CRITERION_VERSIONS["magnitude"]
    assert first["calibration"]["sampling_version"] == SAMPLING_VERSIONS["paper"]
    # Scores stored under the key an older service computed (no versions in it) are a miss.
    info = first["score_cache"]
    old_key = checkpoint_key(
        version=CACHE_VERSION,
        model=info["model_fingerprint"],
        criterion="magnitude",
        calibration=first["calibration"]["fingerprint"],
        dtype="torch.float32",
        device="cpu",
        num_layers=12,
    )
    assert old_key != info["key"]
    cache.save(
        old_key,
        {
            "version": CACHE_VERSION,
            "criterion": "magnitude",
            "block_scores": [0.0] * 12,
            "removal_order": [],
        },
    )
    again = prune_model(spec("magnitude"), tmp_path / "b", score_cache=cache)
    assert again["score_cache"]["hit"] and again["block_scores"] == first["block_scores"]
    # A changed definition misses what the previous one cached, and computes afresh.
    newer = CRITERION_VERSIONS["magnitude"] + 1
    monkeypatch.setitem(prune_module.CRITERION_VERSIONS, "magnitude", newer)
    bumped = prune_model(spec("magnitude"), tmp_path / "c", score_cache=cache)
    assert bumped["score_cache"]["key"] != info["key"] and not bumped["score_cache"]["hit"]
    assert bumped["score_cache"]["computed_scores"] == 12  # magnitude scores every block
    assert json.loads((tmp_path / "c" / "report.json").read_text())["criterion_version"] == newer
