"""Retraining runs on every text family: LoRA and knowledge distillation (with a LoRA student)
take a couple of steps on a random tiny model of each, dense and mixture-of-experts alike, and
write a merged model that reloads and computes something other than the student did. (A
vision-language checkpoint's language model is pruned, not retrained: admission refuses it.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from shortened.engine.retrain import retrain_model
from shortened.specs import RetrainSpec
from tests.helpers import FAMILY_CONFIGS, save_tiny, tiny_model

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]
WORDS = "the quick brown fox jumps over a lazy dog while models prune blocks of layers"


def _spec(root, method: str) -> RetrainSpec:
    settings: dict = {
        "model": str(root / "student"),
        "method": method,
        "micro_batch_size": 2,
        "batch_size": 2,
        "max_steps": 2,
        "warmup_steps": 0,
        "data": {"source": str(root / "text.txt")},
    }
    if method == "kd":
        settings["kd"] = {
            "teacher": str(root / "teacher"),
            "lora": True,
            "max_steps": 2,
            "seq_len": 16,
            "warmup_steps": 0,
        }
    else:
        settings["data"] = {"source": str(root / "alpaca.jsonl")}
    return RetrainSpec.model_validate(settings)


TEXT_FAMILIES = sorted(t for t, config in FAMILY_CONFIGS.items() if "vision_config" not in config)


@pytest.mark.parametrize("model_type", TEXT_FAMILIES)
@pytest.mark.parametrize("method", ["lora", "kd"])
def test_family_retrains_and_merged_model_loads(model_type, method, tmp_path):
    # A test config's 6-layer pattern: let the depth derive it (only where the test config
    # has one: the key itself makes transformers read a Mistral config as Ministral's).
    derived = {"layer_types": None} if "layer_types" in FAMILY_CONFIGS[model_type] else {}
    save_tiny(tiny_model(model_type, num_layers=2, seed=1, **derived), tmp_path / "student")
    save_tiny(tiny_model(model_type, num_layers=4, seed=2, **derived), tmp_path / "teacher")
    (tmp_path / "text.txt").write_text("\n\n".join(f"{WORDS} {i}" * 4 for i in range(30)))
    with (tmp_path / "alpaca.jsonl").open("w") as handle:
        for i in range(16):
            record = {"instruction": WORDS[i : i + 20], "input": "", "output": WORDS[i:]}
            handle.write(json.dumps(record) + "\n")

    report = retrain_model(_spec(tmp_path, method), tmp_path / "out")
    assert report["steps"] == 2 if method == "lora" else report["stages"][0]["stage"] == "kd"
    assert 0 < report["trainable_params"][method] < report["params"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        out, before = merged(ids).logits, student(ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, before)  # training moved it
