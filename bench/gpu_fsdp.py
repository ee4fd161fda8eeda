"""Two-GPU FSDP retraining against the planner: a Llama-3.2-1B-shaped model (random weights,
bf16, nothing downloaded) trained with CPT for 12 steps through the engine's own launch
(``retrain_model`` -> torchrun -> FSDP2 over the visible GPUs, at most 2), then on one GPU
with the same global batch.

Reports, per GPU: training tokens per second (tokens seen / training time / GPUs), the
peak memory each GPU used while the launch ran (``nvidia-smi``, sampled twice a second: it
includes the CUDA context, about 0.5 GB, which torch's own peak does not), the planner's
per-device estimate and their ratio; and the largest relative difference between the two
loss curves (one GPU and two order the data differently, so this is batch noise, a few
per cent, not rounding: the CPU tests pin the exact agreement). Prints one JSON object;
exits 2 when fewer than two GPUs are visible.

    python -m bench.gpu_fsdp [--scratch DIR]      # bench/gpu_check.sh runs it on 2+ GPUs
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.bench_scale import CALIBRATION, tokenizer_with_vocab

GB = 10**9
LLAMA_3_2_1B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
}
STEPS, SEQ_LEN, MICRO, BATCH = 12, 1024, 2, 8


def build(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_3_2_1B), dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer_with_vocab(LLAMA_3_2_1B["vocab_size"]).save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def spec(model: Path, processes: int) -> Any:
    from shortened.specs import RetrainSpec

    return RetrainSpec.model_validate(
        {
            "model": str(model),
            "method": "cpt",
            "device": "cuda",
            "dtype": "bfloat16",
            "data": {"source": str(CALIBRATION)},
            "cpt": {"max_steps": STEPS, "seq_len": SEQ_LEN, "warmup_steps": 2},
            "micro_batch_size": MICRO,
            "batch_size": BATCH,
            "gradient_checkpointing": True,
            "logging_steps": 1,
            "save_steps": 1000,
            "quality_gate": {"max_ppl_ratio": None},
            "distributed": {"nproc_per_node": processes, "strategy": "fsdp"},
        }
    )


class GpuMemory:
    """The most memory each GPU used while it ran (nvidia-smi, every 0.5 s)."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            for line in out.strip().splitlines():
                index, used = (int(field) for field in line.split(","))
                self.peaks[index] = max(self.peaks.get(index, 0), used * 2**20)
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def train(model: Path, output: Path, processes: int) -> dict[str, Any]:
    from shortened.engine.retrain import retrain_model
    from shortened.kinds import plan_job
    from shortened.model_configs import parse_config

    run_spec = spec(model, processes)
    config = parse_config((model / "config.json").read_bytes())
    plan = plan_job("retrain", run_spec, config, "cuda")
    assert plan is not None
    planned = max(stage.peak_bytes for stage in plan.stages if stage.per_device)
    with GpuMemory() as memory:
        started = time.perf_counter()
        report = retrain_model(run_spec, output)
        wall = time.perf_counter() - started
    stage = report["stages"][0]
    used = [memory.peaks.get(i, 0) for i in range(processes)]
    return {
        "gpus": processes,
        "wall_s": round(wall, 1),
        "train_s": stage["runtime_s"],
        "tokens_per_s_per_gpu": round((stage["tokens_seen"] or 0) / stage["runtime_s"] / processes),
        "memory_per_gpu_gb": [round(u / GB, 2) for u in used],
        "planned_per_gpu_gb": round(planned / GB, 2),
        "measured_over_planned": [round(u / planned, 2) for u in used],
        "loss_history": stage["loss_history"],
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print("gpu_fsdp: needs two visible CUDA devices", file=sys.stderr)
        raise SystemExit(2)
    root = Path(tempfile.mkdtemp(prefix="gpu-fsdp-", dir=args.scratch))
    try:
        build(root / "model")
        two = train(root / "model", root / "two", 2)
        one = train(root / "model", root / "one", 1)
        gaps = [
            abs(a[1] - b[1]) / abs(b[1])
            for a, b in zip(two.pop("loss_history"), one.pop("loss_history"), strict=True)
        ]
        result = {
            "model": "Llama-3.2-1B-shaped, random, bf16",
            "steps": STEPS,
            "global_batch": f"{BATCH} x {SEQ_LEN} tokens",
            "fsdp_2_gpus": two,
            "one_gpu": one,
            "loss_curve_max_relative_gap": round(max(gaps), 5),
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
