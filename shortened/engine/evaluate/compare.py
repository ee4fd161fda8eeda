"""The deltas of a model's evaluation against its baseline's (the unpruned parent): parameters,
perplexity, zero-shot accuracy and efficiency, as differences and ratios.
"""

from __future__ import annotations

from typing import Any


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare_results(model: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Deltas of ``model`` against ``baseline`` (model - baseline; ratios model / baseline,
    speed-up baseline latency / model latency)."""
    deltas: dict[str, Any] = {
        "params": {
            "model": model["params"],
            "baseline": baseline["params"],
            "ratio": _ratio(model["params"], baseline["params"]),
            "removed_ratio": 1 - model["params"] / baseline["params"],
        },
        "weight_bytes": {"model": model["weight_bytes"], "baseline": baseline["weight_bytes"]},
    }
    if "perplexity" in model:
        deltas["perplexity"] = {
            name: {
                "model": r["ppl"],
                "baseline": baseline["perplexity"][name]["ppl"],
                "delta": r["ppl"] - baseline["perplexity"][name]["ppl"],
                "ratio": _ratio(r["ppl"], baseline["perplexity"][name]["ppl"]),
            }
            for name, r in model["perplexity"].items()
        }
    if "zero_shot" in model:
        tasks = {}
        for task, r in model["zero_shot"]["tasks"].items():
            base = baseline["zero_shot"]["tasks"][task]["value"]
            tasks[task] = {
                "metric": r["metric"],
                "model": r["value"],
                "baseline": base,
                "delta": r["value"] - base if r["value"] is not None and base is not None else None,
            }
        a, b = model["zero_shot"]["mean_accuracy"], baseline["zero_shot"]["mean_accuracy"]
        deltas["zero_shot"] = {
            "tasks": tasks,
            "mean_accuracy": {
                "model": a,
                "baseline": b,
                "delta": a - b if a is not None and b is not None else None,
            },
        }
    if "efficiency" in model:
        rows = []
        cpu = model["efficiency"]["peak_memory_kind"] == "process_peak_rss"
        for r, base in zip(
            model["efficiency"]["runs"], baseline["efficiency"]["runs"], strict=True
        ):
            rows.append(
                {
                    "batch_size": r["batch_size"],
                    "output_length": r["output_length"],
                    "latency_speedup": _ratio(base["latency_s_mean"], r["latency_s_mean"]),
                    "throughput_ratio": _ratio(
                        r["throughput_tokens_per_s_mean"], base["throughput_tokens_per_s_mean"]
                    ),
                    # A process's peak RSS only grows: comparable between models only on CUDA.
                    "peak_memory_ratio": None
                    if cpu
                    else _ratio(r["peak_memory_bytes"], base["peak_memory_bytes"]),
                }
            )
        deltas["efficiency"] = rows
    return deltas
