"""vLLM as the runtime of an HF-quantized artifact, where the worker has a CUDA GPU and vLLM is
installed: the checkpoint is loaded by vLLM itself (``vllm.LLM``) and greedy generation is
timed at batch 1 and batched, from the same prompt token ids as the other runtimes.

Each measurement runs in its own Python process (``python -m
shortened.engine.export.vllm_runtime``): vLLM holds GPU memory and engine processes for the
life of its ``LLM`` object, and a process that exits returns all of it before the next
artifact (or the rest of the job) needs the GPU. The child prints one JSON object; a child
that fails is a verification failure of the artifact, with the end of its error output.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BATCH_SIZES = (1, 16)
TIMEOUT_S = 900.0


def vllm_unavailable() -> str | None:
    """Why vLLM cannot verify artifacts here (None: it can): it needs CUDA and the package."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this worker"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed on this worker"
    return None


def vllm_measure(
    model_dir: Path,
    prompt_ids: Sequence[int],
    new_tokens: int,
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    timeout_s: float = TIMEOUT_S,
) -> dict[str, Any]:
    """vLLM loads ``model_dir`` in a child process and generates ``new_tokens`` greedy tokens
    from ``prompt_ids`` at each batch size: ``{"layers": n, "tokens_per_s": {"1": x, ...}}``.
    Raises ``RuntimeError`` (with the end of the child's error output) when it cannot."""
    request = {
        "model": str(model_dir),
        "prompt_ids": list(prompt_ids),
        "new_tokens": new_tokens,
        "batch_sizes": list(batch_sizes),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", __name__],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"vLLM did not finish within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])[-600:]
        raise RuntimeError(f"vLLM exited with {done.returncode}: {tail}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError("vLLM printed no result")
    return dict(json.loads(lines[-1]))


def _serve(request: dict[str, Any]) -> dict[str, Any]:
    """In the child: load with vLLM, warm up, time each batch size."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=request["model"], gpu_memory_utilization=0.3, max_model_len=2048, seed=0)
    params = SamplingParams(max_tokens=request["new_tokens"], temperature=0.0, ignore_eos=True)
    prompt = {"prompt_token_ids": request["prompt_ids"]}
    llm.generate([prompt], params, use_tqdm=False)  # kernels, CUDA graphs
    rates = {}
    for batch in request["batch_sizes"]:
        started = time.perf_counter()
        outputs = llm.generate([prompt] * batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        rates[str(batch)] = sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed
    layers = llm.llm_engine.model_config.hf_config.num_hidden_layers
    return {"layers": layers, "tokens_per_s": rates}


if __name__ == "__main__":
    print(json.dumps(_serve(json.loads(sys.stdin.read()))))
