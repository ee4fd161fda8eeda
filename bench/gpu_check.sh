#!/usr/bin/env bash
# GPU readiness: a Llama-3-8B-shaped model (random, bf16, no downloads) through scoring,
# pruning, generation speed-up, LoRA and (with 2+ GPUs) device_map="auto"; see
# bench/gpu_check.py. Fails at once when no CUDA device is visible. Needs ~40 GB of GPU
# memory and ~40 GB of scratch disk (GPU_CHECK_SCRATCH, default the system temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || {
  echo "gpu_check: no CUDA device visible (install the CUDA build with 'make install-gpu')" >&2
  exit 2
}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 480 "$PY" -m bench.gpu_check ${GPU_CHECK_SCRATCH:+--scratch "$GPU_CHECK_SCRATCH"} "$@"
