"""The parent's evaluation results are computed once: a second eval against the same parent,
sections and texts reuses them (and says so); anything they depend on changing is a miss."""

from __future__ import annotations

import shutil

import pytest
import torch

from shortened.engine.baseline_cache import DirectoryBaselineCache
from shortened.engine.evaluate import evaluate_model
from shortened.engine.progress import Progress
from shortened.specs import EvalSpec
from tests.helpers import save_tiny, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from shortened.engine.architectures import keep_blocks

    root = tmp_path_factory.mktemp("baseline")
    parent = tiny_model("llama", num_layers=4)
    save_tiny(parent, root / "parent")
    keep_blocks(parent, [0, 1, 3])
    save_tiny(parent, root / "pruned")
    (root / "text.txt").write_text(" ".join("blocks of layers pruned in one shot".split() * 40))
    return root


def _spec(root, seq_len: int = 32, parent: str = "parent") -> EvalSpec:
    return EvalSpec(
        model=str(root / "pruned"),
        compare_with=str(root / parent),
        perplexity={"datasets": [str(root / "text.txt")], "seq_len": seq_len},
    )


def test_second_eval_reuses_the_parent_results(models, tmp_path) -> None:
    cache = DirectoryBaselineCache(tmp_path / "cache")
    first = evaluate_model(_spec(models), baseline_cache=cache)
    assert first["baseline_cache"]["reused"] is False
    stages: list[Progress] = []
    second = evaluate_model(_spec(models), baseline_cache=cache, progress=stages.append)
    assert second["baseline_cache"]["reused"] is True
    assert second["baseline_cache"]["key"] == first["baseline_cache"]["key"]
    name = str(models / "text.txt")
    assert second["baseline"]["perplexity"][name] == first["baseline"]["perplexity"][name]
    assert second["deltas"] == first["deltas"]
    # The parent was not loaded again: only the pruned model was.
    loads = [p.message for p in stages if p.stage == "loading" and "parent" in (p.message or "")]
    assert loads == []
    # Without a cache it is computed again, to the same figure.
    fresh = evaluate_model(_spec(models))
    assert fresh["baseline"]["perplexity"][name]["ppl"] == pytest.approx(
        first["baseline"]["perplexity"][name]["ppl"], rel=1e-6
    )


def test_what_the_results_depend_on_is_in_the_key(models, tmp_path) -> None:
    cache = DirectoryBaselineCache(tmp_path / "cache")
    evaluate_model(_spec(models), baseline_cache=cache)
    # Other evaluation settings: a miss.
    assert (
        evaluate_model(_spec(models, seq_len=16), baseline_cache=cache)["baseline_cache"]["reused"]
        is False
    )
    # A copy of the parent (same content, other path): a hit.
    shutil.copytree(models / "parent", tmp_path / "parent-copy")
    copy = EvalSpec(
        model=str(models / "pruned"),
        compare_with=str(tmp_path / "parent-copy"),
        perplexity={"datasets": [str(models / "text.txt")], "seq_len": 32},
    )
    assert evaluate_model(copy, baseline_cache=cache)["baseline_cache"]["reused"] is True
    # Changed weights at that path: a miss.
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "parent-copy" / "model.safetensors"
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + torch.ones_like(tensors[first])
    save_file(tensors, weights, metadata={"format": "pt"})
    assert evaluate_model(copy, baseline_cache=cache)["baseline_cache"]["reused"] is False
