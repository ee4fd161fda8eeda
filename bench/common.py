"""Shared bench helpers: a mid-size random Llama built from a config, and peak-memory probes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


# Llama-3.2-1B's block shape (16 blocks, hidden 2048, MLP 8192, 32 heads, 8 key/value heads):
# ``bench_model(**LLAMA_1B_SHAPE, vocab=...)``, 0.98B parameters with the tiny model's 2k vocabulary.
LLAMA_1B_SHAPE = {
    "num_layers": 16,
    "hidden": 2048,
    "intermediate": 8192,
    "heads": 32,
    "kv_heads": 8,
}


def bench_model(
    num_layers: int = 12,
    hidden: int = 768,
    intermediate: int = 2048,
    vocab: int = 8000,
    heads: int = 12,
    kv_heads: int = 4,
):
    """A randomly initialised Llama (about 90M parameters by default): big enough that weights
    dominate memory, small enough for a 2-core CPU. Built from a config: nothing is downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(
        p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's resident high-water mark (VmHWM) of this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_isolated(module: str, *args: str, timeout: int = 600) -> dict[str, Any]:
    """Run ``python -m module args`` in a fresh process (so memory peaks do not mix) and
    parse the JSON object it prints last."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
