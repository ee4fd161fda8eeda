"""The search recipe on models/tiny-llama: the winner is the candidate with the lowest
validation perplexity (checked against an independent computation on fresh copies of the
model), no candidate lies outside the budget, and the validation documents are never scored."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from shortened.engine.errors import NothingToPrune
from shortened.engine.search import search_model, split_documents
from shortened.specs import SearchSpec
from tests.helpers import CALIBRATION, TINY_MODEL

NUM_LAYERS = 12  # models/tiny-llama
SEQ_LEN = 64


def spec(**overrides) -> SearchSpec:
    data = {
        "model": str(TINY_MODEL),
        "criteria": ["ppl", "magnitude", "block_influence"],
        "num_blocks": {"min": 1, "max": 2},
        "calibration": {"source": str(CALIBRATION), "n_samples": 4, "seq_len": SEQ_LEN},
        "validation": {"fraction": 0.2, "seed": 3, "max_windows": 4},
        "device": "cpu",
        "dtype": "float32",
    }
    data.update(overrides)
    return SearchSpec.model_validate(data)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("search") / "out"
    return search_model(spec(), out), out


def validation_windows(document_ids: list[int], max_windows: int) -> torch.Tensor:
    """The held-out documents joined by blank lines, BOS once, cut into SEQ_LEN windows: the
    perplexity protocol, written out here without the engine."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    lines = CALIBRATION.read_text().splitlines()
    texts = [json.loads(lines[i])["text"] for i in document_ids]
    ids = [
        tokenizer.bos_token_id,
        *tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"],
    ]
    windows = [ids[i : i + SEQ_LEN] for i in range(0, len(ids) - SEQ_LEN + 1, SEQ_LEN)]
    return torch.tensor(windows[:max_windows])


def perplexity_without(model: nn.Module, removed: list[int], windows: torch.Tensor) -> float:
    pruned = copy.deepcopy(model)
    kept = [block for i, block in enumerate(pruned.model.layers) if i not in removed]
    pruned.model.layers = nn.ModuleList(kept)
    pruned.config.num_hidden_layers = len(kept)
    for new_index, block in enumerate(kept):
        block.self_attn.layer_idx = new_index
    with torch.no_grad():
        loss = pruned(input_ids=windows, labels=windows, use_cache=False).loss
    return math.exp(float(loss))


def test_the_winner_has_the_lowest_validation_perplexity_computed_independently(searched):
    from transformers import AutoModelForCausalLM

    report, out = searched
    search = report["search"]
    windows = validation_windows(search["validation"]["validation_documents"], 4)
    assert list(windows.shape) == search["validation"]["windows"]
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    independent = {
        tuple(row["removed_blocks"]): perplexity_without(model, row["removed_blocks"], windows)
        for row in search["ranking"]
    }
    for row in search["ranking"]:
        assert row["validation_ppl"] == pytest.approx(
            independent[tuple(row["removed_blocks"])], rel=1e-4
        )
    best = min(independent, key=independent.__getitem__)
    assert search["best"]["removed_blocks"] == list(best)
    assert report["removed_blocks"] == list(best)
    # Ranked best first, each removal set once (identical sets from two criteria merged).
    ppls = [row["validation_ppl"] for row in search["ranking"]]
    assert ppls == sorted(ppls)
    assert len(independent) == len(search["ranking"])
    # The published model is the winner, saved like prune saves.
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_hidden_layers"] == NUM_LAYERS - len(best)
    assert {"model.safetensors", "report.json", "block_scores.csv", "block_scores.svg"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "report.json").read_text())["search"]["best"] == search["best"]


def test_every_criterion_and_count_is_a_candidate(searched):
    report, _ = searched
    search = report["search"]
    seen = {(c, row["num_blocks"]) for row in search["ranking"] for c in row["criteria"]}
    assert seen == {(c, k) for c in ("ppl", "magnitude", "block_influence") for k in (1, 2)}
    for row in search["ranking"]:
        assert row["estimated_speedup"] == pytest.approx(
            NUM_LAYERS / (NUM_LAYERS - row["num_blocks"]), abs=1e-4
        )


def test_validation_documents_are_never_scored(searched):
    report, _ = searched
    validation = set(report["search"]["validation"]["validation_documents"])
    scored = set(report["calibration"]["document_indices"])
    assert validation and scored and not validation & scored
    total = len(CALIBRATION.read_text().splitlines())
    assert len(validation) == math.ceil(0.2 * total)
    assert report["search"]["validation"]["scoring_documents"] == total - len(validation)


def test_the_split_is_disjoint_complete_and_seeded():
    for count, fraction in [(2, 0.5), (10, 0.2), (300, 0.2), (7, 0.99)]:
        scoring, held_out = split_documents(count, fraction, seed=5)
        assert not set(scoring) & set(held_out)
        assert sorted(scoring + held_out) == list(range(count))
        assert 1 <= len(held_out) <= count - 1
        assert split_documents(count, fraction, seed=5) == (scoring, held_out)
    assert split_documents(300, 0.2, seed=5) != split_documents(300, 0.2, seed=6)


def _params_removed(k: int) -> float:
    """The fraction of the tiny model's parameters k of its (equal) blocks hold."""
    config = json.loads((TINY_MODEL / "config.json").read_text())
    hidden, inter, heads, kv, head_dim = 128, 320, 4, 2, 32
    block = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * inter
    block += 2 * hidden
    total = config["vocab_size"] * hidden + NUM_LAYERS * block + hidden
    return k * block / total


BUDGETS = [
    (
        {"target_ratio": 0.1},
        lambda k: k == min(range(1, 7), key=lambda n: abs(_params_removed(n) - 0.1)),
    ),
    (
        {"target_ratio": 0.3},
        lambda k: k == min(range(1, 7), key=lambda n: abs(_params_removed(n) - 0.3)),
    ),
    ({"num_blocks": {"min": 2, "max": 3}}, lambda k: 2 <= k <= 3),
    ({"num_blocks": {"min": 5, "max": 9}}, lambda k: 5 <= k <= 6),  # 6 removable
    ({"min_speedup": 1.25}, lambda k: NUM_LAYERS / (NUM_LAYERS - k) >= 1.25),
    ({"min_speedup": 1.9}, lambda k: NUM_LAYERS / (NUM_LAYERS - k) >= 1.9),
]


@pytest.mark.parametrize(("budget", "within"), BUDGETS, ids=[json.dumps(b[0]) for b in BUDGETS])
def test_no_candidate_outside_the_budget(budget, within, tmp_path, one_torch_thread):
    overrides = {"num_blocks": None, **budget, "criteria": ["magnitude", "block_influence"]}
    overrides["validation"] = {"max_windows": 2}
    report = search_model(spec(**overrides), tmp_path / "out")
    counts = report["search"]["block_counts"]
    # Every admissible count (6 removable blocks: 4 protected first, 2 last) was tried ...
    assert counts == [k for k in range(1, 7) if within(k)]
    # ... and nothing else, and the winner is one of them.
    assert all(within(row["num_blocks"]) for row in report["search"]["ranking"])
    assert within(report["num_blocks_removed"])
    assert report["num_blocks_removed"] == report["search"]["best"]["num_blocks"]
    assert all(4 <= b < 10 for b in report["removed_blocks"])  # protected blocks stay


def test_a_budget_nothing_can_meet_is_refused(tmp_path):
    with pytest.raises(NothingToPrune, match="no block count within the budget"):
        search_model(spec(num_blocks=None, min_speedup=2.5), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_default_criteria_are_the_registry_s_one_shot_ones():
    from shortened.engine.criteria import CRITERIA as REGISTRY
    from shortened.specs import ONE_SHOT_CRITERIA

    assert set(ONE_SHOT_CRITERIA) == set(REGISTRY) - {"iterative_ppl"}
    assert SearchSpec.model_validate(
        {"model": "m", "calibration": {"source": "c.jsonl"}, "target_ratio": 0.2}
    ).criteria == list(ONE_SHOT_CRITERIA)
