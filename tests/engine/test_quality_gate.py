"""The quality gate: prune, search and retrain measure their output's perplexity on held-out
text against the parent's; a collapsed output fails with ``quality_gate`` and nothing is
saved, a sane one carries the ratio in its report; ``max_ppl_ratio: null`` turns it off."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened.engine.calibration import read_documents
from shortened.engine.errors import QualityGateFailed
from shortened.engine.evaluate import perplexity_windows
from shortened.engine.prune import prune_model
from shortened.engine.quality_gate import held_out_windows
from shortened.engine.retrain import retrain_model
from shortened.engine.search import search_model
from shortened.specs import (
    DEFAULT_MAX_PPL_RATIO,
    CalibrationSpec,
    PruneSpec,
    RetrainSpec,
    SearchSpec,
)
from tests.helpers import CALIBRATION, HELDOUT, TINY_MODEL, perplexity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIBRATION_SPEC = {"source": str(CALIBRATION), "n_samples": 4}


def prune(tmp_path, **spec) -> dict:
    settings = {"model": str(TINY_MODEL), "num_blocks": 3, "calibration": CALIBRATION_SPEC}
    return prune_model(PruneSpec.model_validate({**settings, **spec}), tmp_path / "out")


def test_prune_measures_both_models_on_calibration_documents_not_used_for_scoring(tmp_path):
    report = prune(tmp_path)
    gate = report["quality_gate"]
    assert gate["measured"] and gate["passed"] and gate["max_ppl_ratio"] == DEFAULT_MAX_PPL_RATIO
    assert gate["windows"] == 8 and gate["window_source"].startswith("calibration documents not")
    assert (
        report["ppl_ratio"] == gate["ppl_ratio"] == pytest.approx(gate["ppl"] / gate["parent_ppl"])
    )
    assert 1.0 < report["ppl_ratio"] < 2.0  # 3 of 12 blocks: worse, far from collapsed

    # Independently: the documents the scoring windows were not drawn from, in file order,
    # joined and cut into 128-token windows; both perplexities computed from the logits.
    used = set(report["calibration"]["document_indices"])
    documents = read_documents(CALIBRATION, keep_empty=True)
    text = "\n\n".join(d for i, d in enumerate(documents) if i not in used and d.strip())
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = perplexity_windows(ids, 128, tokenizer.bos_token_id, False)[:8]
    parent = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert gate["parent_ppl"] == pytest.approx(perplexity(parent, windows), rel=1e-4)
    assert gate["ppl"] == pytest.approx(perplexity(pruned, windows), rel=1e-4)
    assert (
        json.loads((tmp_path / "out" / "report.json").read_text())["ppl_ratio"] == gate["ppl_ratio"]
    )


def test_a_collapsed_prune_fails_the_default_gate_and_saves_nothing(tmp_path):
    # Magnitude with protection off removes the first 10 blocks: about 500x the parent's
    # perplexity on the tiny model.
    with pytest.raises(QualityGateFailed, match="over quality_gate.max_ppl_ratio 20") as caught:
        prune(tmp_path, criterion="magnitude", num_blocks=10, protect_first=0, protect_last=0)
    assert caught.value.code == "quality_gate"
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_a_null_ratio_turns_the_gate_off_and_a_low_one_fails_a_sane_prune(tmp_path):
    report = prune(
        tmp_path,
        criterion="magnitude",
        num_blocks=10,
        protect_first=0,
        protect_last=0,
        quality_gate={"max_ppl_ratio": None},
    )
    assert report["ppl_ratio"] is None and report["quality_gate"]["measured"] is False
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(QualityGateFailed, match="times its parent's"):
        prune(tmp_path / "strict", quality_gate={"max_ppl_ratio": 1.01})
    assert not (tmp_path / "strict" / "out").exists()


def test_without_calibration_data_the_gate_says_it_could_not_measure(tmp_path):
    spec = PruneSpec(model=str(TINY_MODEL), criterion="magnitude", num_blocks=2)
    report = prune_model(spec, tmp_path / "out")
    assert report["quality_gate"] == {
        "max_ppl_ratio": DEFAULT_MAX_PPL_RATIO,
        "measured": False,
        "reason": "no calibration data",
    }


def test_held_out_windows_read_only_the_documents_they_need():
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    documents = read_documents(CALIBRATION)
    spec = CalibrationSpec(source=str(CALIBRATION))
    read = []

    class Counting(list):
        def __getitem__(self, index):
            read.append(index)
            return super().__getitem__(index)

    windows = held_out_windows(Counting(documents), range(len(documents)), tokenizer, spec, 4)
    # The same windows as cutting the whole text, from a fraction of the documents.
    ids = tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"]
    assert (
        windows.tolist() == perplexity_windows(ids, 128, tokenizer.bos_token_id, False)[:4].tolist()
    )
    assert 0 < len(read) < len(documents) // 4


def search_spec(**gate) -> SearchSpec:
    return SearchSpec.model_validate(
        {
            "model": str(TINY_MODEL),
            "criteria": ["magnitude", "block_influence"],
            "num_blocks": {"min": 2, "max": 3},
            "calibration": CALIBRATION_SPEC,
            "validation": {"max_windows": 4},
            "quality_gate": gate,
        }
    )


def test_search_gates_its_best_candidate_on_the_validation_windows(tmp_path):
    report = search_model(search_spec(), tmp_path / "out")
    gate, best = report["quality_gate"], report["search"]["best"]
    assert gate["window_source"] == "the search's validation windows" and gate["windows"] == 4
    assert gate["ppl"] == best["validation_ppl"]
    assert report["ppl_ratio"] == pytest.approx(best["validation_ppl"] / gate["parent_ppl"])
    assert 1.0 < report["ppl_ratio"] < 2.0
    # No candidate is better than the best: over the gate, none could be published.
    with pytest.raises(QualityGateFailed, match="best candidate"):
        search_model(search_spec(max_ppl_ratio=1.001), tmp_path / "strict")
    assert not (tmp_path / "strict").exists()


def retrain_spec(**overrides) -> RetrainSpec:
    settings = {
        "model": str(TINY_MODEL),
        "method": "cpt",
        "data": {"source": str(HELDOUT.parent / "stdlib_docs_train.jsonl"), "max_records": 200},
        "cpt": {"max_steps": 2, "seq_len": 64, "warmup_steps": 0},
        "micro_batch_size": 4,
        "batch_size": 4,
        "device": "cpu",
    }
    return RetrainSpec.model_validate({**settings, **overrides})


def test_retrain_gates_on_the_validation_split_else_the_training_data(tmp_path):
    data = {"source": str(HELDOUT.parent / "stdlib_docs_train.jsonl"), "max_records": 200}
    report = retrain_model(
        retrain_spec(data={**data, "validation_size": 12}, quality_gate={"windows": 5}),
        tmp_path / "held-out",
    )
    gate = report["quality_gate"]
    assert gate["window_source"] == "validation data" and gate["windows"] == 5
    assert gate["passed"] and math.isfinite(gate["parent_ppl"])
    assert report["ppl_ratio"] == pytest.approx(gate["ppl"] / gate["parent_ppl"], rel=1e-5)

    report = retrain_model(retrain_spec(), tmp_path / "train")
    assert report["quality_gate"]["window_source"] == "training data (no validation split)"

    off = retrain_model(retrain_spec(quality_gate={"max_ppl_ratio": None}), tmp_path / "off")
    assert off["ppl_ratio"] is None and off["quality_gate"]["measured"] is False


def test_a_retrain_that_wrecks_the_model_fails_the_gate_and_saves_nothing(tmp_path, monkeypatch):
    # Gradient ascent on the loss: every step makes the model worse, every number finite.
    from transformers import Trainer

    compute_loss = Trainer.compute_loss
    monkeypatch.setattr(
        Trainer, "compute_loss", lambda self, *args, **kwargs: -compute_loss(self, *args, **kwargs)
    )
    spec = retrain_spec(
        cpt={"max_steps": 3, "seq_len": 64, "warmup_steps": 0, "learning_rate": 3e-3},
        quality_gate={"max_ppl_ratio": 2.0},
    )
    with pytest.raises(QualityGateFailed, match="retrained model's perplexity") as caught:
        retrain_model(spec, tmp_path / "out")
    assert "over quality_gate.max_ppl_ratio 2" in str(caught.value)
    assert not (tmp_path / "out").exists()
