"""Block scores are cached by model content, criterion and calibration: a second prune of
the same model with another block count or protection scores nothing it already has, and
anything that changes the scores (weights, calibration, criterion) misses the cache."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

from shortened.engine.prune import prune_model
from shortened.engine.score_cache import DirectoryScoreCache, StoreScoreCache, directory_fingerprint
from shortened.specs import CalibrationSpec, PruneSpec
from tests.helpers import CALIBRATION, TINY_MODEL


def spec(**overrides) -> PruneSpec:
    fields = {
        "model": str(TINY_MODEL),
        "criterion": "ppl",
        "num_blocks": 2,
        "protect_first": 1,
        "protect_last": 1,
        "calibration": CalibrationSpec(source=str(CALIBRATION), n_samples=4, seq_len=64),
        "device": "cpu",
        "dtype": "float32",
    }
    fields.update(overrides)
    return PruneSpec(**fields)


@pytest.fixture
def cache(tmp_path):
    return DirectoryScoreCache(tmp_path / "scores")


def test_grid_over_block_counts_scores_once(tmp_path, cache, one_torch_thread):
    first = prune_model(spec(num_blocks=2), tmp_path / "k2", score_cache=cache)
    assert first["score_cache"]["reused_scores"] == 0
    assert first["score_cache"]["computed_scores"] == 10  # blocks 1..10 of 12
    assert first["scores_reused"] == 0

    second = prune_model(spec(num_blocks=4), tmp_path / "k4", score_cache=cache)
    assert second["score_cache"]["reused_scores"] == 10
    assert second["score_cache"]["computed_scores"] == 0
    assert second["scores_reused"] == 10
    assert second["block_scores"] == first["block_scores"]
    assert second["removal_order"] == first["removal_order"]
    assert set(first["removed_blocks"]) <= set(second["removed_blocks"])
    assert len(second["removed_blocks"]) == 4
    # What was reused is visible in the saved report too.
    saved = json.loads((tmp_path / "k4" / "report.json").read_text())
    assert saved["score_cache"]["key"] == first["score_cache"]["key"]


def test_uncached_blocks_are_computed_and_added(tmp_path, cache, one_torch_thread):
    prune_model(spec(protect_first=3, protect_last=1), tmp_path / "a", score_cache=cache)  # 3..10
    wider = prune_model(spec(protect_first=1, protect_last=1), tmp_path / "b", score_cache=cache)
    assert wider["score_cache"]["reused_scores"] == 8
    assert wider["score_cache"]["computed_scores"] == 2  # blocks 1 and 2
    again = prune_model(spec(protect_first=1, protect_last=1), tmp_path / "c", score_cache=cache)
    assert again["score_cache"]["computed_scores"] == 0


def test_same_scores_as_without_cache(tmp_path, cache, one_torch_thread):
    plain = prune_model(spec(criterion="taylor"), tmp_path / "plain")
    prune_model(spec(criterion="taylor"), tmp_path / "warm", score_cache=cache)
    # Other protection: the removal order is re-derived from the cached scores.
    cached = prune_model(
        spec(criterion="taylor", protect_first=4, protect_last=2),
        tmp_path / "hit",
        score_cache=cache,
    )
    assert cached["score_cache"]["hit"] and cached["score_cache"]["computed_scores"] == 0
    assert cached["block_scores"] == pytest.approx(plain["block_scores"], rel=1e-6)
    assert all(4 <= b < 10 for b in cached["removal_order"])
    assert "score_cache" not in plain or plain["score_cache"] is None


def test_changed_weights_calibration_or_criterion_miss(tmp_path, cache, one_torch_thread):
    prune_model(spec(), tmp_path / "base", score_cache=cache)

    other_model = tmp_path / "perturbed"
    shutil.copytree(TINY_MODEL, other_model)
    weights = other_model / "model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in tensors if "layers.5." in n)
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    assert directory_fingerprint(other_model) != directory_fingerprint(TINY_MODEL)

    misses = {
        "weights": spec(model=str(other_model)),
        "calibration": spec(
            calibration=CalibrationSpec(source=str(CALIBRATION), n_samples=5, seq_len=64)
        ),
        "criterion": spec(criterion="block_influence"),
    }
    for name, changed in misses.items():
        report = prune_model(changed, tmp_path / name, score_cache=cache)
        assert report["score_cache"]["reused_scores"] == 0, name


def test_a_copy_of_the_model_elsewhere_hits(tmp_path, cache, one_torch_thread):
    """The key is the content, not the path: a copy (e.g. downloaded again) reuses scores."""
    prune_model(spec(), tmp_path / "base", score_cache=cache)
    copy = tmp_path / "copy"
    shutil.copytree(TINY_MODEL, copy)
    report = prune_model(spec(model=str(copy)), tmp_path / "out", score_cache=cache)
    assert report["score_cache"]["computed_scores"] == 0


def test_damaged_entry_is_a_miss_and_is_replaced(tmp_path, cache, one_torch_thread):
    first = prune_model(spec(), tmp_path / "a", score_cache=cache)
    entry = cache.directory / f"{first['score_cache']['key']}.json"
    entry.write_text("{not json")
    second = prune_model(spec(), tmp_path / "b", score_cache=cache)
    assert second["score_cache"]["reused_scores"] == 0
    assert json.loads(entry.read_text())["version"] == "block-scores/v1"


def _prune_in_process(args):
    out, cache_dir, num_blocks = args
    torch.set_num_threads(1)
    report = prune_model(
        spec(num_blocks=num_blocks), out, score_cache=DirectoryScoreCache(cache_dir)
    )
    return report["score_cache"]


def test_concurrent_runs_of_one_key_score_once(tmp_path):
    """Two processes start together: one scores, the other waits on the key's lock and
    then reuses everything."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(
            _prune_in_process,
            [(tmp_path / "a", tmp_path / "cache", 2), (tmp_path / "b", tmp_path / "cache", 3)],
        )
    assert sorted(r["computed_scores"] for r in results) == [0, 10]
    assert sorted(r["reused_scores"] for r in results) == [0, 10]


def test_store_backed_cache_round_trip(tmp_path, s3_server, one_torch_thread):
    import boto3

    from shortened.storage import open_store

    bucket = f"score-cache-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    store = open_store(f"s3://{bucket}/cache-test", s3_endpoint_url=s3_server)
    first = prune_model(spec(), tmp_path / "a", score_cache=StoreScoreCache(store))
    assert first["score_cache"]["location"].startswith("score-cache/")
    assert store.exists(first["score_cache"]["location"])
    second = prune_model(spec(num_blocks=3), tmp_path / "b", score_cache=StoreScoreCache(store))
    assert second["score_cache"]["computed_scores"] == 0


def test_cli_reports_reuse(tmp_path):
    def run(out: str, blocks: int) -> str:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "shortened.cli",
                "prune",
                "--model",
                str(TINY_MODEL),
                "--calibration",
                str(CALIBRATION),
                "--n-samples",
                "4",
                "--seq-len",
                "64",
                "--num-blocks",
                str(blocks),
                "--protect-first",
                "1",
                "--protect-last",
                "1",
                "--device",
                "cpu",
                "--output",
                str(tmp_path / out),
                "--score-cache",
                str(tmp_path / "c"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "0 block scores reused, 10 computed" in run("a", 2)
    assert "10 block scores reused, 0 computed" in run("b", 3)
