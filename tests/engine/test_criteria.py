"""Criteria on tiny random models: exactness against the naive computation, shapes, protection."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from shortened.engine.architectures import adapter_for, keep_blocks
from shortened.engine.criteria import CRITERIA, ScoringContext, ppl_scores_naive
from shortened.engine.errors import Cancelled
from shortened.engine.progress import Progress
from tests.helpers import tiny_model

WINDOWS = torch.randint(3, 96, (6, 24), generator=torch.Generator().manual_seed(0))


def context(model, num_blocks=2, candidates=None, **kwargs):
    adapter = adapter_for(model)
    n = adapter.num_layers(model)
    return ScoringContext(
        model,
        adapter,
        WINDOWS,
        candidates if candidates is not None else list(range(1, n - 1)),
        num_blocks,
        batch_size=4,
        **kwargs,
    )


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen2"])
def test_ppl_equals_naive_rebuild(model_type):
    model = tiny_model(model_type, num_layers=6)
    fast = CRITERIA["ppl"](context(model, score_all_blocks=True)).block_scores
    naive = ppl_scores_naive(model, WINDOWS, batch_size=4)
    assert len(fast) == 6
    for a, b in zip(fast, naive, strict=True):
        assert abs(a - b) / b < 1e-4


def test_ppl_is_exact_whatever_the_lm_head_chunk(monkeypatch):
    """The LM head runs a byte budget of tokens at a time (a few dozen with a 128K vocabulary):
    chunk boundaries inside and across windows change nothing."""
    import shortened.planning

    model = tiny_model("llama", num_layers=6)
    vocab = model.get_output_embeddings().weight.shape[0]
    naive = ppl_scores_naive(model, WINDOWS, batch_size=4)
    for tokens in (1, 7, 23, 10_000):  # one token; across windows of 23 targets; exactly one; all
        monkeypatch.setattr(shortened.planning, "HEAD_CHUNK_BYTES", tokens * 4 * vocab)
        assert shortened.planning.head_chunk_tokens(vocab) == tokens
        fast = CRITERIA["ppl"](context(model, score_all_blocks=True)).block_scores
        for a, b in zip(fast, naive, strict=True):
            assert abs(a - b) / b < 1e-4


def test_ppl_baseline_matches_full_model():
    model = tiny_model("llama")
    result = CRITERIA["ppl"](context(model))
    with torch.no_grad():
        loss = model(input_ids=WINDOWS, labels=WINDOWS).loss
    assert result.details["baseline_ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-4)


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_scores_every_block_and_respects_protection(name):
    model = tiny_model("llama", num_layers=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    candidates = [2, 3, 4, 5]
    seen: list[Progress] = []
    result = CRITERIA[name](
        context(model, num_blocks=2, candidates=candidates, progress=seen.append)
    )
    assert len(result.block_scores) == 8
    assert sorted(result.removal_order) == candidates
    assert all(s is None or math.isfinite(s) for s in result.block_scores)
    assert all(result.block_scores[b] is not None for b in candidates)
    assert seen and all(p.stage == "scoring" for p in seen) and seen[-1].done == seen[-1].total
    # Scoring never changes the model.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(model.model.layers) == 8 and all(p.grad is None for p in model.parameters())


def test_ppl_skips_protected_blocks_unless_asked():
    model = tiny_model("llama", num_layers=6)
    default = CRITERIA["ppl"](context(model, candidates=[2, 3]))
    full = CRITERIA["ppl"](context(model, candidates=[2, 3], score_all_blocks=True))
    assert [s is None for s in default.block_scores] == [True, True, False, False, True, True]
    assert default.block_scores[2:4] == full.block_scores[2:4]
    assert None not in full.block_scores


def test_lower_score_is_removed_first():
    model = tiny_model("llama", num_layers=8)
    result = CRITERIA["magnitude"](context(model, candidates=[2, 3, 4, 5]))
    scores = [result.block_scores[b] for b in result.removal_order]
    assert scores == sorted(scores)


def test_magnitude_is_sum_of_absolute_weights():
    model = tiny_model("llama", num_layers=4)
    result = CRITERIA["magnitude"](context(model, candidates=[1, 2]))
    expected = sum(p.abs().sum().item() for p in model.model.layers[1].parameters())
    assert result.block_scores[1] == pytest.approx(expected, rel=1e-6)


def test_taylor_equals_full_gradient_computation():
    model = tiny_model("llama", num_layers=4)
    result = CRITERIA["taylor"](context(model, candidates=[1, 2]))
    reference = copy.deepcopy(model)
    logits = reference(input_ids=WINDOWS).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), WINDOWS[:, 1:].flatten())
    loss.backward()
    for block in range(4):
        expected = sum(
            (p * p.grad).abs().sum().item()  # Taylor+: |w * dL/dw| element-wise, then summed
            for p in reference.model.layers[block].parameters()
        )
        assert result.block_scores[block] == pytest.approx(expected, rel=1e-4)


def test_angular_removes_a_contiguous_run():
    model = tiny_model("llama", num_layers=8)
    result = CRITERIA["angular"](context(model, num_blocks=3, candidates=[1, 2, 3, 4, 5, 6]))
    run = result.removal_order[:3]
    assert run == list(range(run[0], run[0] + 3))
    assert result.details["run_start"] == run[0]


def test_iterative_ppl_first_pick_matches_one_shot_ppl():
    model = tiny_model("llama", num_layers=6)
    one_shot = CRITERIA["ppl"](context(model, candidates=[1, 2, 3, 4]))
    iterative = CRITERIA["iterative_ppl"](context(model, num_blocks=2, candidates=[1, 2, 3, 4]))
    assert iterative.removal_order[0] == one_shot.removal_order[0]
    # The second pick is scored on the model without the first.
    first, second = iterative.removal_order[:2]
    pruned = copy.deepcopy(model)
    keep_blocks(pruned, [b for b in range(6) if b != first])
    naive = ppl_scores_naive(pruned, WINDOWS)
    kept = [b for b in range(6) if b != first]
    assert iterative.block_scores[second] == pytest.approx(naive[kept.index(second)], rel=1e-4)


def test_cancel_from_progress_stops_scoring():
    model = tiny_model("llama", num_layers=6)
    calls = []

    def cancel_after_two(update: Progress) -> None:
        calls.append(update)
        if len(calls) == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        CRITERIA["ppl"](context(model, progress=cancel_after_two))
    assert len(calls) == 2 and len(model.model.layers) == 6
