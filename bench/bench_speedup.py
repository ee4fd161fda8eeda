"""Pruned vs original model: generation latency and throughput at batch 1, 8 and 32, against
the ideal speed-up L / (L - k). Uses the engine's efficiency measurement (warm-up, repeats,
forced output length, as the paper's timing script).

    python -m bench.bench_speedup
"""

from __future__ import annotations

import copy
import json
import statistics

import torch
from transformers import AutoTokenizer

from bench.common import REPO, bench_model
from shortened.engine.architectures import keep_blocks
from shortened.engine.evaluate import evaluate_efficiency
from shortened.engine.progress import no_progress
from shortened.specs import EfficiencySpec

NUM_LAYERS, REMOVED = 12, [4, 5, 6, 7]
BATCH_SIZES = [1, 8, 32]
ROUNDS = 3


def run() -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    original = bench_model(num_layers=NUM_LAYERS).to(device)
    pruned = copy.deepcopy(original)
    keep_blocks(pruned, [b for b in range(NUM_LAYERS) if b not in REMOVED])
    tokenizer = AutoTokenizer.from_pretrained(REPO / "models" / "tiny-llama")
    models = {"original": original, "pruned": pruned}
    warmup = EfficiencySpec(
        batch_sizes=BATCH_SIZES, output_lengths=[8], input_length=32, repeats=1, warmup=0
    )
    for model in models.values():
        evaluate_efficiency(model, tokenizer, warmup, no_progress)
    # Interleave the two models, one timed run each per round, so load changes on a shared
    # machine hit both alike; the median round counts.
    spec = EfficiencySpec(
        batch_sizes=BATCH_SIZES, output_lengths=[32], input_length=32, repeats=1, warmup=0
    )
    rounds = {name: [] for name in models}
    for _ in range(ROUNDS):
        for name, model in models.items():
            rounds[name].append(evaluate_efficiency(model, tokenizer, spec, no_progress)["runs"])
    measured = {
        name: [
            {
                **runs[0][i],
                "latency_s_mean": statistics.median(r[i]["latency_s_mean"] for r in runs),
                "throughput_tokens_per_s_mean": statistics.median(
                    r[i]["throughput_tokens_per_s_mean"] for r in runs
                ),
            }
            for i in range(len(BATCH_SIZES))
        ]
        for name, runs in rounds.items()
    }
    ideal = NUM_LAYERS / (NUM_LAYERS - len(REMOVED))
    rows, context = (
        [],
        {
            "device": str(device),
            "ideal_speedup": round(ideal, 3),
            "model": f"random Llama, {NUM_LAYERS} layers, hidden 768, {len(REMOVED)} removed",
        },
    )
    for before, after in zip(measured["original"], measured["pruned"], strict=True):
        speedup = before["latency_s_mean"] / after["latency_s_mean"]
        batch = before["batch_size"]
        rows.append(
            (
                f"generation speed-up / ideal, batch {batch} ({device.type})",
                speedup / ideal,
                ">= 0.9" if batch == 1 else "-",
            )
        )
        context[f"batch_{batch}"] = {
            "latency_s": [round(before["latency_s_mean"], 4), round(after["latency_s_mean"], 4)],
            "tokens_per_s": [
                round(before["throughput_tokens_per_s_mean"], 1),
                round(after["throughput_tokens_per_s_mean"], 1),
            ],
            "speedup": round(speedup, 3),
        }
    return {"name": "speedup", "rows": rows, "context": context}


if __name__ == "__main__":
    print(json.dumps(run()))
