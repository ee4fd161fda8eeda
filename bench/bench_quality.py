"""Recovery after depth pruning: LoRA, CPT and knowledge distillation from the parent (KD),
at the same token budget, on the repository's trained tiny model (models/tiny-llama, 12
blocks).

The model is pruned by 25 % and 50 % of its blocks (3 and 6, PPL criterion on
data/calibration.jsonl, one block protected at each end so the criterion chooses), then each
method trains the pruned model for the same steps x batch x 128-token sequences on the same
text (data/stdlib_docs_train.jsonl less a validation slice). Each method runs at every
learning rate of LEARNING_RATES and keeps the one with the lowest perplexity on the
validation slice (the held-out file plays no part in that choice). Measured: held-out
perplexity (data/stdlib_docs_heldout.txt, the evaluate engine's protocol) and the fraction of
the pruning gap each method recovers, (pruned - recovered) / (pruned - original).

    python -m bench.bench_quality     # the table, docs/quality.json and .png, a JSON line last
    python -m bench.bench_quality --plot-only   # redraw docs/quality.png from the JSON files

docs/quality.png shows these figures beside the real model's recovery at the same kind of
budget, read from docs/real-model.json (``make bench-real``): SmolLM2-135M-Instruct,
Q4_1-dequantized, 10 of 30 blocks removed.

Run on its own (``make bench-quality``): its 24 short trainings would take most of
``bench.run_all``'s 10-minute budget.

LoRA trains on padded examples, CPT and KD on packed blocks: LoRA gets the training text
already cut into the same 128-token pieces, so every method sees the same tokens per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO
from shortened.engine.evaluate import evaluate_model
from shortened.engine.prune import prune_model
from shortened.engine.retrain import retrain_model
from shortened.engine.retrain_data import pack_blocks
from shortened.specs import EvalSpec, PruneSpec, RetrainSpec

MODEL = REPO / "models" / "tiny-llama"
CALIBRATION = REPO / "data" / "calibration.jsonl"
TRAIN = REPO / "data" / "stdlib_docs_train.jsonl"
HELDOUT = REPO / "data" / "stdlib_docs_heldout.txt"
PLOT = REPO / "docs" / "quality.png"
RESULTS = REPO / "docs" / "quality.json"
REAL_RESULTS = REPO / "docs" / "real-model.json"

REMOVED = {"25%": 3, "50%": 6}
METHODS = ("lora", "cpt", "kd")
STEPS, BATCH, MICRO_BATCH, SEQ_LEN = 40, 8, 4, 128
VALIDATION_RECORDS = 150
# Every method gets the same grid. Runs on narrower grids chose their lowest rate for CPT and
# KD (1e-3 of 1e-3..3e-3, then 3e-4 of 3e-4..3e-3), so the grid reaches down to 1e-4.
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
WARMUP_STEPS = 4


def split_data(work: Path, tokenizer: Any) -> dict[str, Path]:
    """Training records, LoRA's copy of them cut into SEQ_LEN-token pieces, and the
    validation slice (for choosing learning rates; the held-out file is only measured)."""
    records = [json.loads(line) for line in TRAIN.read_text().splitlines() if line.strip()]
    train, validation = records[:-VALIDATION_RECORDS], records[-VALIDATION_RECORDS:]
    paths = {
        "train": work / "train.jsonl",
        "train_blocks": work / "train_blocks.jsonl",
        "validation": work / "validation.txt",
    }
    paths["train"].write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in train))
    blocks = pack_blocks((r["text"] for r in train), tokenizer, SEQ_LEN)
    paths["train_blocks"].write_text(
        "".join(
            json.dumps({"text": tokenizer.decode(block, skip_special_tokens=True)}) + "\n"
            for block in blocks
        )
    )
    paths["validation"].write_text("\n\n".join(r["text"] for r in validation))
    return paths


def perplexity(model_dir: Path, text: Path) -> float:
    spec = EvalSpec(
        model=str(model_dir), perplexity={"datasets": [str(text)], "seq_len": SEQ_LEN}, device="cpu"
    )
    return evaluate_model(spec)["model"]["perplexity"][str(text)]["ppl"]


def prune(work: Path, blocks: int) -> Path:
    output = work / f"pruned-{blocks}"
    spec = PruneSpec(
        model=str(MODEL),
        criterion="ppl",
        num_blocks=blocks,
        calibration={"source": str(CALIBRATION)},
        protect_first=1,
        protect_last=1,
        device="cpu",
    )
    prune_model(spec, output)
    return output


def recover(method: str, pruned: Path, data: dict[str, Path], lr: float, output: Path) -> dict:
    """One method, STEPS optimizer steps of BATCH x SEQ_LEN tokens; its report."""
    common: dict[str, Any] = {
        "model": str(pruned),
        "method": method,
        "micro_batch_size": MICRO_BATCH,
        "batch_size": BATCH,
        "logging_steps": 10,
        "device": "cpu",
        "seed": 1234,
    }
    budget = {"max_steps": STEPS, "learning_rate": lr, "warmup_steps": WARMUP_STEPS}
    if method == "lora":
        spec = {
            **common,
            "data": {"source": str(data["train_blocks"]), "format": "text"},
            "cutoff_len": SEQ_LEN,
            "learning_rate": lr,
            "warmup_steps": WARMUP_STEPS,
            "max_steps": STEPS,
        }
    elif method == "cpt":
        spec = {
            **common,
            "data": {"source": str(data["train"])},
            "cpt": {**budget, "seq_len": SEQ_LEN},
        }
    else:
        spec = {
            **common,
            "data": {"source": str(data["train"])},
            "kd": {**budget, "seq_len": SEQ_LEN, "teacher": str(MODEL)},
        }
    return retrain_model(RetrainSpec.model_validate(spec), output)


def gap_recovered(original: float, pruned: float, recovered: float) -> float:
    return (pruned - recovered) / (pruned - original)


COLORS = {"pruned": "#999999", "lora": "#4c72b0", "cpt": "#dd8452", "kd": "#55a868"}


def _real_panel(axis: Any, real: dict[str, Any]) -> None:
    """The real model's gap recovered per method (docs/real-model.json's recovery)."""
    recovery = real["recovery"]
    for i, name in enumerate(METHODS):
        value = recovery["methods"][name]["gap_recovered"]
        axis.bar(i, value, 0.6, color=COLORS[name], label=name)
        axis.text(i, value, f"{value:.0%}", ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(METHODS)), list(METHODS))
    axis.set_ylim(0, 1)
    axis.set_ylabel("fraction of the pruning gap recovered")
    axis.set_title(
        f"SmolLM2-135M-Instruct, Q4_1-dequantized:\n{recovery['pruned']} of 30 blocks "
        f"removed, {recovery['budget_tokens']:,} tokens each",
        fontsize=9,
    )


def plot(results: dict[str, Any], path: Path, real: dict[str, Any] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = list(REMOVED)
    names = ["pruned", *METHODS]
    colors = COLORS
    if real is not None:
        fig, (left, right, third) = plt.subplots(
            1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [3, 3, 2]}
        )
        _real_panel(third, real)
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.2
    for i, name in enumerate(names):
        xs = [r + (i - 1.5) * width for r in range(len(ratios))]
        left.bar(
            xs, [results[r]["ppl"][name] for r in ratios], width, label=name, color=colors[name]
        )
    for r, ratio in enumerate(ratios):
        original = results[ratio]["ppl"]["original"]
        left.hlines(original, r - 2 * width, r + 2 * width, colors="black", linestyles="dashed")
    left.set_xticks(range(len(ratios)), [f"{r} of blocks removed" for r in ratios])
    left.set_ylabel("held-out perplexity (dashed: unpruned)")
    left.legend()
    for i, name in enumerate(METHODS):
        xs = [r + (i - 1) * width for r in range(len(ratios))]
        right.bar(
            xs,
            [results[r]["gap_recovered"][name] for r in ratios],
            width,
            label=name,
            color=colors[name],
        )
    right.set_xticks(range(len(ratios)), [f"{r} of blocks removed" for r in ratios])
    right.set_ylabel("fraction of the pruning gap recovered")
    right.axhline(0, color="black", linewidth=0.8)
    right.legend()
    title = f"tiny-llama (12 blocks): {STEPS} steps x {BATCH} x {SEQ_LEN} tokens per method"
    left.set_title(title, fontsize=9)
    right.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log(message: str, started: float) -> None:
    print(
        f"[quality {time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True
    )


def run() -> dict[str, Any]:
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = Path(tmp)
        data = split_data(work, tokenizer)
        original = perplexity(MODEL, HELDOUT)
        results: dict[str, Any] = {}
        for ratio, blocks in REMOVED.items():
            model_dir = prune(work, blocks)
            ppl = {"original": original, "pruned": perplexity(model_dir, HELDOUT)}
            log(f"{ratio}: original {original:.2f}, pruned {ppl['pruned']:.2f}", started)
            chosen, validation, tokens, seconds = {}, {}, {}, {}
            for method in METHODS:
                trials = {}
                for lr in LEARNING_RATES:
                    output = work / f"{ratio[:2]}-{method}-{lr:g}"
                    report = recover(method, model_dir, data, lr, output)
                    trials[lr] = (perplexity(output, data["validation"]), output, report)
                    log(f"{ratio} {method} lr {lr:g}: validation ppl {trials[lr][0]:.2f}", started)
                best = min(trials, key=lambda lr: trials[lr][0])
                _, output, report = trials[best]
                ppl[method] = perplexity(output, HELDOUT)
                chosen[method] = best
                validation[method] = {f"{lr:g}": round(t[0], 3) for lr, t in trials.items()}
                tokens[method] = report["stages"][0]["tokens_seen"]
                seconds[method] = report["stages"][0]["runtime_s"]
                log(f"{ratio} {method}: lr {best:g}, held-out ppl {ppl[method]:.2f}", started)
            results[ratio] = {
                "blocks_removed": blocks,
                "ppl": ppl,
                "gap_recovered": {
                    m: gap_recovered(original, ppl["pruned"], ppl[m]) for m in METHODS
                },
                "learning_rate": chosen,
                "validation_ppl_by_lr": validation,
                "tokens_seen": tokens,
                "train_seconds": seconds,
            }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, PLOT, _real_results())
    return {"results": results, "seconds": round(time.perf_counter() - started, 1)}


def _real_results() -> dict[str, Any] | None:
    return json.loads(REAL_RESULTS.read_text()) if REAL_RESULTS.is_file() else None


def table(results: dict[str, Any]) -> str:
    lines = [
        "| removed | original | pruned | LoRA | CPT | KD | gap recovered: LoRA | CPT | KD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio, r in results.items():
        ppl, gap = r["ppl"], r["gap_recovered"]
        lines.append(
            f"| {ratio} ({r['blocks_removed']} blocks) | {ppl['original']:.2f} | {ppl['pruned']:.2f} | "
            + " | ".join(f"{ppl[m]:.2f}" for m in METHODS)
            + " | "
            + " | ".join(f"{gap[m]:.1%}" for m in METHODS)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw docs/quality.png from the JSON files"
    )
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(RESULTS.read_text()), PLOT, _real_results())
        return
    torch.set_num_threads(args.threads)
    measured = run()
    results = measured["results"]
    print(table(results), file=sys.stderr)
    print(f"plot: {PLOT.relative_to(REPO)}; {measured['seconds']} s", file=sys.stderr)
    rows = []
    for ratio, r in results.items():
        for method in METHODS:
            rows.append((f"held-out ppl, {ratio} pruned, {method}", r["ppl"][method], "-"))
        gap = r["gap_recovered"]
        rows.append((f"KD - LoRA gap recovered, {ratio} pruned", gap["kd"] - gap["lora"], "> 0"))
        rows.append(
            (
                f"KD - CPT gap recovered, {ratio} pruned",
                gap["kd"] - gap["cpt"],
                ">= 0" if ratio == "50%" else "-",
            )
        )
    context = {
        "model": "models/tiny-llama (12 blocks)",
        "budget": f"{STEPS} steps x {BATCH} x {SEQ_LEN} tokens",
        "learning_rate_grid": LEARNING_RATES,
        "results": results,
    }
    print(json.dumps({"rows": rows, "context": context}))


if __name__ == "__main__":
    main()
