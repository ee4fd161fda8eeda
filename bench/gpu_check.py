"""GPU readiness at the size users bring: a Llama-3-8B-shaped model (random weights, bf16,
nothing downloaded) through the engine on one GPU, in about 5 minutes on an H100-class card.

1. build the model on the GPU and save it (bf16 safetensors, 5 GB shards) to a scratch dir;
2. ``ppl`` and ``taylor`` scoring (``prune_model``, 10 calibration windows of 128 tokens, 8
   blocks removed): wall time and peak CUDA memory over the weight bytes;
3. generation speed-up of the pruned model against the original (the engine's efficiency
   evaluation, greedy, 128 new tokens) at batch 1, 8 and 32, next to the ideal L/(L-k);
4. LoRA for 20 steps with gradient checkpointing: wall time, peak CUDA memory;
5. with more than one GPU visible: the model spread with ``device_map="auto"`` (each GPU
   capped so it must spread) gives the same loss as on one GPU.

Prints one JSON object; exits 2 at once, with the reason, when no CUDA device exists.

    bash bench/gpu_check.sh            # or: python -m bench.gpu_check [--scratch DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_scale import CALIBRATION, tokenizer_with_vocab

GB = 10**9
LLAMA_3_8B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
}
NUM_BLOCKS = 8


def require_cuda() -> Any:
    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}); run `make install-gpu` on a machine with an "
            "NVIDIA GPU",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return torch


def build(path: Path) -> int:
    """The random 8B-shaped checkpoint (built on the GPU: seconds, not minutes); its bytes."""
    torch = require_cuda()
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_3_8B), dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    tokenizer_with_vocab(LLAMA_3_8B["vocab_size"]).save_pretrained(path)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return weights


def measured(run: Any) -> tuple[Any, dict[str, Any]]:
    """``run()``'s result, wall time and peak CUDA memory (allocated by torch)."""
    torch = require_cuda()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = run()
    torch.cuda.synchronize()
    figures = {
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(),
    }
    return result, figures


def prune(source: Path, output: Path, criterion: str, weights: int) -> dict[str, Any]:
    from shortened.engine.prune import prune_model
    from shortened.kinds import plan_job
    from shortened.specs import PruneSpec

    spec = PruneSpec(
        model=str(source),
        criterion=criterion,  # type: ignore[arg-type]  # one of the two criteria
        num_blocks=NUM_BLOCKS,
        dtype="bfloat16",
        device="cuda",
        batch_size=10,
        calibration={"source": str(CALIBRATION), "n_samples": 10, "seq_len": 128},
    )
    report, figures = measured(lambda: prune_model(spec, output))
    plan = plan_job("prune", spec, json.loads((source / "config.json").read_text()), "cuda")
    assert plan is not None  # every kind benchmarked here has a plan
    return {
        **figures,
        "peak_over_weights": round(figures["peak_cuda_bytes"] / weights, 2),
        "planned_peak_over_measured": round(plan.peak_bytes / figures["peak_cuda_bytes"], 2),
        "timings": report["timings"],
        "removed_blocks": report["removed_blocks"],
    }


def speedup(original: Path, pruned: Path) -> dict[str, Any]:
    from shortened.engine.evaluate import evaluate_model
    from shortened.specs import EvalSpec

    spec = EvalSpec(
        model=str(pruned),
        compare_with=str(original),
        dtype="bfloat16",
        device="cuda",
        efficiency={"batch_sizes": [1, 8, 32], "output_lengths": [128], "repeats": 3},
    )
    result, figures = measured(lambda: evaluate_model(spec))
    layers = LLAMA_3_8B["num_hidden_layers"]
    return {
        **figures,
        "ideal_speedup": round(layers / (layers - NUM_BLOCKS), 3),
        "comparison": (result.get("deltas") or {}).get("efficiency"),
    }


def lora(pruned: Path, output: Path, weights: int) -> dict[str, Any]:
    from shortened.engine.retrain import retrain_model
    from shortened.specs import RetrainSpec

    spec = RetrainSpec(
        model=str(pruned),
        method="lora",
        data={"source": str(CALIBRATION), "validation_size": 4},
        max_steps=20,
        micro_batch_size=4,
        batch_size=4,
        cutoff_len=256,
        warmup_steps=2,
        gradient_checkpointing=True,
        dtype="bfloat16",
        device="cuda",
    )
    report, figures = measured(lambda: retrain_model(spec, output))
    return {
        **figures,
        "peak_over_pruned_weights": round(figures["peak_cuda_bytes"] / weights, 2),
        "steps": report["steps"],
        "final_train_loss": report["final_train_loss"],
    }


def spread(source: Path, weights: int) -> dict[str, Any]:
    """device_map="auto" over every visible GPU, each capped to its share: the same loss."""
    torch = require_cuda()
    count = torch.cuda.device_count()
    if count < 2:
        return {"skipped": f"{count} GPU visible: device_map spreading needs 2 or more"}
    from transformers import AutoModelForCausalLM

    share = int(weights / count * 1.3)
    ids = torch.randint(0, LLAMA_3_8B["vocab_size"], (2, 128))
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=torch.bfloat16,
        device_map="auto",
        max_memory={i: share for i in range(count)},
    )
    devices = sorted({str(d) for d in model.hf_device_map.values()})
    with torch.no_grad():
        loss_spread = model(input_ids=ids.to(model.device), labels=ids.to(model.device)).loss
    del model
    torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map="cuda:0")
    with torch.no_grad():
        loss_one = model(input_ids=ids.cuda(), labels=ids.cuda()).loss
    return {
        "devices": devices,
        "loss_spread": round(float(loss_spread), 4),
        "loss_one_gpu": round(float(loss_one), 4),
        "same_loss": abs(float(loss_spread) - float(loss_one)) < 1e-2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, help="where the 16 GB checkpoint goes")
    args = parser.parse_args()
    torch = require_cuda()
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.scratch))
    started = time.perf_counter()
    try:
        source = scratch / "llama-3-8b-random"
        weights = build(source)
        results: dict[str, Any] = {
            "device": torch.cuda.get_device_name(0),
            "gpus": torch.cuda.device_count(),
            "weight_gb": round(weights / GB, 2),
            "build_s": round(time.perf_counter() - started, 1),
        }
        results["ppl"] = prune(source, scratch / "ppl", "ppl", weights)
        results["taylor"] = prune(source, scratch / "taylor", "taylor", weights)
        shutil.rmtree(scratch / "taylor")
        results["speedup"] = speedup(source, scratch / "ppl")
        pruned_weights = weights * (32 - NUM_BLOCKS) // 32
        results["lora"] = lora(scratch / "ppl", scratch / "lora", pruned_weights)
        results["device_map_auto"] = spread(source, weights)
        results["total_s"] = round(time.perf_counter() - started, 1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
