#!/usr/bin/env bash
# GPU readiness: a Llama-3-8B-shaped model (random, bf16, no downloads) through scoring,
# pruning, generation speed-up, LoRA and (with 2+ GPUs) device_map="auto"; see
# bench/gpu_check.py. Then, with 2+ GPUs, FSDP2 retraining over two of them through the
# engine's torchrun launch: tokens/s per GPU and memory per GPU against the planner's
# per-device estimate (bench/gpu_fsdp.py). With vLLM installed (pip install vllm), the pruned
# model against its parent in vLLM at W4A16 and FP8, batch 1 and 32 (bench/gpu_vllm.py).
# Fails at once when no CUDA device is visible.
# Needs ~40 GB of GPU memory and ~40 GB of scratch disk (GPU_CHECK_SCRATCH, default the
# system temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" -eq 0 ]; then
  echo "gpu_check: no CUDA device visible (install the CUDA build with 'make install-gpu')" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SCRATCH=(${GPU_CHECK_SCRATCH:+--scratch "$GPU_CHECK_SCRATCH"})
timeout 480 "$PY" -m bench.gpu_check "${SCRATCH[@]}" "$@"
if [ "$GPUS" -ge 2 ]; then
  # Two GPUs, FSDP: the engine starts torchrun itself (shortened.engine.retrain.launch).
  timeout 420 "$PY" -m bench.gpu_fsdp "${SCRATCH[@]}"
else
  echo "gpu_check: 1 GPU visible: the 2-GPU FSDP check (bench/gpu_fsdp.py) is skipped" >&2
fi
if "$PY" -c "import vllm" 2>/dev/null; then
  timeout 540 "$PY" -m bench.gpu_vllm "${SCRATCH[@]}"
else
  echo "gpu_check: vLLM is not installed: the vLLM comparison (bench/gpu_vllm.py) is skipped" >&2
fi
