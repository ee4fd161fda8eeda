"""ppl scoring: ours (hidden states reused) vs the naive rebuild-per-block structure of the
paper's code, on the same model and calibration windows; plus Taylor+ peak memory, in forwards
of 4 windows (the prune default: the gradient adds up over 3 forwards) and in one forward of all
10 (the paper's batch: each gradient is reduced and freed as it completes).

    python -m bench.bench_scoring            # runs every method in its own process, prints a table
    python -m bench.bench_scoring --method fast|fast_all|naive|taylor|taylor_one_forward  # one, JSON
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.common import (
    bench_model,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_isolated,
    weight_bytes,
)

N_SAMPLES, SEQ_LEN = 10, 128
METHODS = ("naive", "fast_all", "fast", "taylor", "taylor_one_forward")


def measure(method: str) -> dict:
    from shortened.engine.architectures import adapter_for
    from shortened.engine.criteria import CRITERIA, ScoringContext, ppl_scores_naive
    from shortened.engine.prune import removable_blocks

    torch.set_num_threads(torch.get_num_threads())
    model = bench_model()
    weights = weight_bytes(model)
    windows = torch.randint(
        0, model.config.vocab_size, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(1)
    )
    adapter = adapter_for(model)
    candidates = removable_blocks(adapter.num_layers(model), 4, 2)
    resident_before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    if method == "naive":
        scores = ppl_scores_naive(model, windows)
    else:
        criterion = "taylor" if method.startswith("taylor") else "ppl"
        batch_size = N_SAMPLES if method == "taylor_one_forward" else 4
        context = ScoringContext(
            model,
            adapter,
            windows,
            candidates,
            2,
            batch_size,
            score_all_blocks=method == "fast_all",
        )
        scores = CRITERIA[criterion](context).block_scores
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "seconds": seconds,
        "peak_over_base": weights + peak_rss_bytes() - resident_before,
        "weight_bytes": weights,
        "scores": scores,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=METHODS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method)))
        return
    print(json.dumps(run()))


def run() -> dict:
    results = {m: run_isolated("bench.bench_scoring", "--method", m) for m in METHODS}
    naive, fast_all, fast = results["naive"], results["fast_all"], results["fast"]
    max_rel = max(abs(a - b) / b for a, b in zip(fast_all["scores"], naive["scores"], strict=True))
    weights = naive["weight_bytes"]
    rows = [
        (
            "ppl scoring speed-up, all blocks (same scores)",
            naive["seconds"] / fast_all["seconds"],
            ">= 2.5",
        ),
        (
            "ppl scoring speed-up, removable blocks (prune default)",
            naive["seconds"] / fast["seconds"],
            ">= 2.5",
        ),
        ("ppl peak memory / weight bytes (ours)", fast_all["peak_over_base"] / weights, "<= 1.3"),
        ("ppl peak memory / weight bytes (naive)", naive["peak_over_base"] / weights, "-"),
        (
            "Taylor+ peak memory / weight bytes, forwards of 4",
            results["taylor"]["peak_over_base"] / weights,
            "-",
        ),
        (
            "Taylor+ peak memory / weight bytes, one forward of 10",
            results["taylor_one_forward"]["peak_over_base"] / weights,
            "-",
        ),
        ("max relative score difference ours vs naive", max_rel, "<= 1e-4"),
    ]
    context = {
        "model": "random Llama, 12 layers, hidden 768, fp32",
        "weight_mb": round(weights / 2**20, 1),
        "seconds": {k: round(v["seconds"], 2) for k, v in results.items()},
    }
    return {"name": "scoring", "rows": rows, "context": context}


if __name__ == "__main__":
    main()
