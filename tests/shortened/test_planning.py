"""The plan before the work: figures from config.json alone against a real model and a real
pruning run, the CLI's --dry-run (no torch), and the memory refusal of the admission path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shortened.engine.prune import prune_model
from shortened.kinds import plan_job
from shortened.planning import GB, insufficient_memory
from shortened.specs import EvalSpec, PruneSpec, RetrainSpec
from tests.helpers import CALIBRATION, REPO, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "model"
    model = tiny_model("llama", num_layers=10, hidden_size=64, intermediate_size=160)
    model.to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def prune_spec(model: Path, **overrides) -> PruneSpec:
    return PruneSpec.model_validate(
        {
            "model": str(model),
            "num_blocks": 3,
            "calibration": {"source": str(CALIBRATION), "n_samples": 2, "seq_len": 16},
            **overrides,
        }
    )


def test_plan_matches_the_real_model_and_the_real_output(bf16_model: Path, tmp_path: Path):
    config = json.loads((bf16_model / "config.json").read_text())
    spec = prune_spec(bf16_model, criterion="magnitude", calibration=None)
    plan = plan_job("prune", spec, config)
    report = prune_model(spec, tmp_path / "out")

    assert plan.params_before == report["params_before"]
    assert plan.params_after == report["params_after"]
    assert plan.protected_blocks == report["protected_blocks"] == [0, 1, 2, 3, 8, 9]
    assert plan.removable_blocks == [4, 5, 6, 7] and plan.num_blocks == 3
    weights = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    # The safetensors header (names, shapes, offsets) is the only difference.
    assert plan.output_bytes <= weights <= plan.output_bytes * 1.02 + 16_384
    assert plan.output_dtype == "bfloat16" and plan.compute_dtype == "float32"
    assert plan.weight_bytes == 4 * plan.params_before


def test_plan_per_stage_follows_dtype_criterion_and_pipeline(bf16_model: Path):
    config = json.loads((bf16_model / "config.json").read_text())
    llama_8b = {**config, "hidden_size": 4096, "intermediate_size": 14336,
                "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
                "vocab_size": 128256, "tie_word_embeddings": False, "head_dim": 128}  # fmt: skip
    fp32 = plan_job("prune", prune_spec(bf16_model, num_blocks=5, dtype="float32"), llama_8b)
    bf16 = plan_job("prune", prune_spec(bf16_model, num_blocks=5, dtype="bfloat16"), llama_8b)
    assert 8.0e9 < bf16.params_before < 8.1e9  # Llama-3-8B: 8.03 B parameters
    assert fp32.weight_bytes == 2 * bf16.weight_bytes
    assert 1.6 < fp32.peak_bytes / bf16.peak_bytes
    # float32 from a bf16 checkpoint: the mapped bf16 pages are resident while loading.
    assert "mapped source" in fp32.stages[0].formula
    assert "mapped source" not in bf16.stages[0].formula
    taylor = plan_job(
        "prune",
        prune_spec(
            bf16_model,
            num_blocks=5,
            criterion="taylor",
            dtype="bfloat16",
            # 8 windows in forwards of 4: the block gradients add up (held in full)
            calibration={"source": str(CALIBRATION), "n_samples": 8, "seq_len": 128},
        ),
        llama_8b,
    )
    assert taylor.peak_stage == "scoring taylor" and taylor.peak_bytes > bf16.peak_bytes
    assert "gradients" in taylor.stages[1].formula
    pipeline = plan_job(
        "prune",
        prune_spec(
            bf16_model,
            num_blocks=5,
            retrain={"data": {"source": str(CALIBRATION)}, "dtype": "bfloat16"},
            eval={"perplexity": {"datasets": ["wikitext2"]}},
        ),
        llama_8b,
    )
    assert [s.name for s in pipeline.stages] == [
        "load", "scoring ppl", "remove+save", "retrain lora", "eval"]  # fmt: skip
    # The follow-ups work on the pruned model: 27 blocks, not 32.
    lora = pipeline.stages[3]
    assert lora.peak_bytes > pipeline.params_after * 2 > lora.peak_bytes / 3
    retrain = plan_job(
        "retrain",
        RetrainSpec(
            model=str(bf16_model),
            data={"source": str(CALIBRATION)},
            method="cpt",
            cpt={"max_steps": 1},
        ),  # fmt: skip
        llama_8b,
    )
    assert retrain.stages[-1].name == "retrain cpt"
    assert retrain.peak_bytes > 4 * 4 * retrain.params_before  # fp32 weights, grads, 2 states
    evaluation = plan_job(
        "eval",
        EvalSpec(model=str(bf16_model), device="cuda", perplexity={"datasets": ["wikitext2"]}),
        llama_8b,
    )
    assert evaluation.compute_dtype == "bfloat16" and evaluation.device == "cuda"


def test_a_plan_over_the_limit_says_by_how_much(bf16_model: Path):
    spec = prune_spec(bf16_model)
    plan = plan_job("prune", spec, json.loads((bf16_model / "config.json").read_text()))
    assert insufficient_memory(plan, plan.peak_bytes) is None
    message = insufficient_memory(plan, plan.peak_bytes - 1)
    assert message is not None and f"peak of this job is {plan.peak_bytes / GB:.1f} GB" in message
    assert plan.peak_stage in message


def test_cli_dry_run_prints_the_plan_without_torch(bf16_model: Path, tmp_path: Path):
    probe = (
        "import sys, runpy; sys.argv = ['shortened'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('shortened.cli', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print('torch imported:', 'torch' in sys.modules); raise\n"
    )
    args = ["prune", "--model", str(bf16_model), "--num-blocks", "2", "--dry-run",
            "--calibration", str(CALIBRATION), "--dtype", "bfloat16"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", probe, *args],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "protected blocks: [0, 1, 2, 3, 8, 9]" in result.stdout
    assert "scoring ppl" in result.stdout and "peak:" in result.stdout
    assert "bfloat16 on cpu" in result.stdout
    assert "torch imported: False" in result.stdout
    assert not (tmp_path / "out").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "shortened.cli", *args[:-2], "--num-blocks", "7"],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"},
    )  # fmt: skip
    assert bad.returncode == 2 and "num_blocks" in bad.stderr
