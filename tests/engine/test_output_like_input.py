"""A checkpoint comes out as it went in: bf16 stays bf16, a sharded checkpoint is saved in
shards with a valid index (the source's shard size unless the spec gives one), and every
stage runs with ``dtype bfloat16`` on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from shortened.engine.evaluate import evaluate_model
from shortened.engine.outputs import shard_size_bytes, source_shard_size
from shortened.engine.prune import prune_model
from shortened.engine.retrain import retrain_model
from shortened.specs import EvalSpec, PruneSpec, RetrainSpec
from tests.helpers import CALIBRATION, HELDOUT, tiny_model, tiny_tokenizer

SHARD = "200KB"


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory) -> Path:
    """A tiny llama (about 1.2 MB in bf16) saved in bf16 as several 200 KB shards."""
    path = tmp_path_factory.mktemp("sharded") / "model"
    model = tiny_model("llama", num_layers=6, hidden_size=128, intermediate_size=256)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size=SHARD)
    tiny_tokenizer().save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def check_checkpoint(path: Path, dtype: torch.dtype, max_shard: int) -> AutoModelForCausalLM:
    """The index names every tensor of the shards, each shard holds what the index says and
    no more than ``max_shard`` bytes of tensors; the checkpoint reloads in ``dtype``."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted({name for name in index["weight_map"].values()})
    assert sorted(p.name for p in path.glob("*.safetensors")) == shards and len(shards) > 1
    total = 0
    for shard in shards:
        with safe_open(str(path / shard), "pt") as handle:
            names = set(handle.keys())
            assert names == {k for k, v in index["weight_map"].items() if v == shard}
            tensors = [handle.get_tensor(name) for name in names]
        assert {t.dtype for t in tensors} == {dtype}
        size = sum(t.numel() * t.element_size() for t in tensors)
        assert size <= max_shard or len(tensors) == 1
        total += size
    assert index["metadata"]["total_size"] == total
    model = AutoModelForCausalLM.from_pretrained(path)
    assert next(model.parameters()).dtype == dtype
    return model


@pytest.mark.parametrize("criterion", ["ppl", "taylor", "block_influence"])
def test_prune_in_bf16_keeps_bf16_and_the_source_shards(sharded_bf16, tmp_path, criterion):
    spec = PruneSpec(
        model=str(sharded_bf16),
        criterion=criterion,
        num_blocks=2,
        protect_first=1,
        protect_last=1,
        dtype="bfloat16",
        device="cpu",
        calibration={"source": str(CALIBRATION), "n_samples": 4, "seq_len": 32},
    )
    report = prune_model(spec, tmp_path / "out")
    assert report["dtype"] == "bfloat16" and report["model_commit"] is None
    assert all(isinstance(s, float) for b, s in enumerate(report["block_scores"]) if s is not None)
    source_max = source_shard_size(sharded_bf16)
    assert source_max is not None and source_max <= shard_size_bytes(SHARD) + 4096
    model = check_checkpoint(tmp_path / "out", torch.bfloat16, source_max)
    assert model.config.num_hidden_layers == 4
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]


def test_float32_run_on_bf16_source_saves_bf16_with_the_spec_shard_size(sharded_bf16, tmp_path):
    spec = PruneSpec(
        model=str(sharded_bf16),
        criterion="magnitude",
        num_blocks=1,
        protect_first=1,
        protect_last=1,
        dtype="float32",
        max_shard_size="300KB",
    )
    report = prune_model(spec, tmp_path / "out")
    assert report["dtype"] == "float32"
    check_checkpoint(tmp_path / "out", torch.bfloat16, shard_size_bytes("300KB"))


def test_single_file_source_saves_a_single_file(tmp_path):
    path = tmp_path / "model"
    tiny_model("llama", num_layers=4).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    assert source_shard_size(path) is None
    prune_model(
        PruneSpec(model=str(path), criterion="magnitude", num_blocks=1, protect_first=1),
        tmp_path / "out",
    )
    assert [p.name for p in (tmp_path / "out").glob("*.safetensors")] == ["model.safetensors"]


def test_lora_and_eval_in_bf16_on_cpu(sharded_bf16, tmp_path):
    spec = RetrainSpec(
        model=str(sharded_bf16),
        method="lora",
        data={"source": str(HELDOUT), "format": "text", "validation_size": 2},
        cutoff_len=32,
        warmup_steps=0,
        micro_batch_size=2,
        batch_size=2,
        max_steps=2,
        dtype="bfloat16",
        device="cpu",
    )
    report = retrain_model(spec, tmp_path / "lora")
    assert report["precision"].startswith("bfloat16 weights") and report["steps"] == 2
    check_checkpoint(tmp_path / "lora", torch.bfloat16, source_shard_size(sharded_bf16) or 0)

    result = evaluate_model(
        EvalSpec(
            model=str(tmp_path / "lora"),
            dtype="bfloat16",
            device="cpu",
            perplexity={"datasets": [str(HELDOUT)], "seq_len": 32, "max_windows": 4},
        )
    )
    ppl = result["model"]["perplexity"][str(HELDOUT)]["ppl"]
    assert 1.0 < ppl < float("inf")
