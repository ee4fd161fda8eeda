"""A broken model is never published: NaN or infinity in block scores, weights, training or
validation losses, distillation and evaluation figures fails the stage with ``non_finite``
before its output directory appears; and the spec's training bounds are ones that train."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened.engine.errors import NonFinite, QualityGateFailed
from shortened.engine.evaluate import evaluate_model
from shortened.engine.finite import check_finite, check_finite_weights
from shortened.engine.prune import prune_model
from shortened.engine.retrain import retrain_model
from shortened.specs import EvalSpec, PruneSpec, RetrainSpec
from tests.helpers import HELDOUT, TINY_MODEL, tiny_model

TRAIN_TEXT = HELDOUT.parent / "stdlib_docs_train.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def broken_copy(path, parameter: str, block: int | None = None):
    """tiny-llama saved with NaN in one parameter (of block ``block``, or a top-level one)."""
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    owner = model.model.layers[block] if block is not None else model.model
    with torch.no_grad():
        owner.get_parameter(parameter).view(-1)[0] = float("nan")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(path)
    return path


def test_check_finite_names_where_the_nan_is():
    check_finite({"a": [1.0, 2], "b": None, "c": "text", "d": True}, "figures")
    with pytest.raises(NonFinite, match=r"the scores is not finite \(b\[1\] = nan\)") as caught:
        check_finite({"a": 1.0, "b": [0.5, math.nan]}, "the scores")
    assert caught.value.code == "non_finite"
    with pytest.raises(NonFinite, match=r"\(\[2\] = inf\)"):
        check_finite(torch.tensor([0.0, 1.0, math.inf]), "losses")


def test_check_finite_weights_names_the_parameter_and_skips_frozen_ones_when_asked():
    model = tiny_model("llama", num_layers=2)
    check_finite_weights(model, "here")
    weight = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight[0, 0] = float("inf")
    with pytest.raises(NonFinite, match=r"model.layers.1.mlp.down_proj.weight .* here"):
        check_finite_weights(model, "here")
    weight.requires_grad_(False)
    check_finite_weights(model, "here", trainable_only=True)  # an optimizer cannot change it


def test_nan_block_scores_fail_the_prune_before_anything_is_saved(tmp_path):
    broken = broken_copy(tmp_path / "broken", "mlp.down_proj.weight", block=6)
    spec = PruneSpec(model=str(broken), criterion="magnitude", num_blocks=2)
    with pytest.raises(NonFinite, match=r"block scores .*\[6\] = nan"):
        prune_model(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_nan_weights_outside_the_blocks_fail_the_prune_before_saving(tmp_path):
    # Magnitude scores the blocks' weights only and, without data, runs no forward: the
    # check of the weights to be saved is what finds the final norm's NaN.
    broken = broken_copy(tmp_path / "broken", "norm.weight")
    spec = PruneSpec(model=str(broken), criterion="magnitude", num_blocks=2)
    with pytest.raises(NonFinite, match=r"weight model.norm.weight holds NaN"):
        prune_model(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def short_retrain(model, **overrides) -> RetrainSpec:
    settings = {
        "model": str(model),
        "method": "cpt",
        "data": {"source": str(TRAIN_TEXT), "max_records": 200, "validation_size": 8},
        "cpt": {"max_steps": 3, "seq_len": 64, "warmup_steps": 0},
        "micro_batch_size": 4,
        "batch_size": 4,
        "logging_steps": 1,
        "save_steps": 1,
        "device": "cpu",
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            settings[key] = {**settings.get(key, {}), **value}
        else:
            settings[key] = value
    return RetrainSpec.model_validate(settings)


def test_a_nan_training_loss_stops_training_at_that_step_and_saves_nothing(tmp_path, monkeypatch):
    from transformers import Trainer

    compute_loss = Trainer.compute_loss
    calls = []

    def nan_from_the_second_step(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        calls.append(self.state.global_step)
        if self.model.training and self.state.global_step >= 1:
            return (loss[0] * math.nan, loss[1]) if isinstance(loss, tuple) else loss * math.nan
        return loss

    monkeypatch.setattr(Trainer, "compute_loss", nan_from_the_second_step)
    checkpoints = tmp_path / "checkpoints"
    spec = short_retrain(TINY_MODEL, quality_gate={"max_ppl_ratio": None})
    with pytest.raises(NonFinite, match=r"after cpt step 2") as caught:
        retrain_model(spec, tmp_path / "out", checkpoint_dir=checkpoints)
    assert caught.value.code == "non_finite"
    assert not (tmp_path / "out").exists()
    # Stopped at the first bad step, before its checkpoint: step 1's is the last one saved.
    saved = sorted(p.name for p in (checkpoints / "cpt").glob("checkpoint-*"))
    assert saved == ["checkpoint-1"]


def test_a_teacher_with_nan_outputs_fails_distillation_with_non_finite(tmp_path):
    teacher = broken_copy(tmp_path / "teacher", "norm.weight")
    spec = short_retrain(
        TINY_MODEL,
        method="kd",
        cpt=None,
        kd={"teacher": str(teacher), "max_steps": 2, "seq_len": 64, "warmup_steps": 0},
    )
    with pytest.raises(NonFinite, match="kd"):
        retrain_model(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_perplexity_fails_the_evaluation_and_writes_no_report(tmp_path):
    broken = broken_copy(tmp_path / "broken", "norm.weight")
    spec = EvalSpec(model=str(broken), perplexity={"datasets": [str(HELDOUT)], "max_windows": 2})
    with pytest.raises(NonFinite, match=r"perplexity.*ppl = nan"):
        evaluate_model(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------- training bounds

# Every bound of docs/training-bounds.md at its extreme, one stage each (3 steps on
# tiny-llama): each either trains (finite, changed weights) or fails cleanly, publishing
# nothing.
EXTREMES = {
    "cpt max lr and weight decay": {"cpt": {"learning_rate": 3e-3, "weight_decay": 1.0}},
    "lora max lr, rank 1, max alpha, max dropout": {
        "method": "lora",
        "cpt": None,
        "learning_rate": 1e-2,
        "lora": {"r": 1, "alpha": 4096, "dropout": 0.5},
        "max_steps": 3,
        "cutoff_len": 64,
    },
    "kd min temperature": {
        "method": "kd",
        "cpt": None,
        "kd": {"teacher": str(TINY_MODEL), "max_steps": 3, "seq_len": 64, "temperature": 0.1},
    },
    "kd max temperature, max lr": {
        "method": "kd",
        "cpt": None,
        "kd": {
            "teacher": str(TINY_MODEL),
            "max_steps": 3,
            "seq_len": 64,
            "temperature": 100.0,
            "learning_rate": 3e-3,
            "alpha": 0.0,
        },
    },
}


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft's probe
@pytest.mark.parametrize("case", sorted(EXTREMES))
def test_extreme_in_range_settings_train_or_fail_cleanly(case, tmp_path):
    spec = short_retrain(TINY_MODEL, **EXTREMES[case])
    out = tmp_path / "out"
    try:
        report = retrain_model(spec, out)
    except (NonFinite, QualityGateFailed):
        assert not out.exists()
        return
    trained = load_file(out / "model.safetensors")
    before = load_file(TINY_MODEL / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in trained.values())
    assert any(not torch.equal(trained[k], before[k]) for k in before if k in trained)
    assert math.isfinite(report["final_train_loss"]) and report["ppl_ratio"] is not None
    assert json.loads((out / "report.json").read_text())["quality_gate"]["passed"] is True


@pytest.mark.parametrize(
    "section,value,field",
    [
        ({"kd": {"teacher": "t", "max_steps": 1, "temperature": 0.05}}, "kd", "temperature"),
        ({"cpt": {"max_steps": 1, "learning_rate": 0.02}}, "cpt", "learning_rate"),
        ({"cpt": {"max_steps": 1, "weight_decay": 1.5}}, "cpt", "weight_decay"),
        ({"lora": {"alpha": 5000}}, "lora", "alpha"),
        ({"lora": {"dropout": 0.6}}, "lora", "dropout"),
        ({"learning_rate": 0.05}, None, "learning_rate"),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_field(section, value, field):
    method = "kd" if "kd" in section else "cpt" if "cpt" in section else "lora"
    with pytest.raises(ValidationError) as caught:
        RetrainSpec.model_validate(
            {"model": "m", "method": method, "data": {"source": "d.jsonl"}, **section}
        )
    locs = [".".join(map(str, e["loc"])) for e in caught.value.errors()]
    assert (f"{value}.{field}" if value else field) in locs
