"""``shortened eval``: perplexity, zero-shot accuracy and generation speed of a model, and
optionally of its parent with the deltas between them, in this process (no service
involved). Its options are one table of rows over ``EvalSpec``; the printed tables read the
report, deltas included, as the engine wrote it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..specs import PAPER_TASK_METRICS, EvalSpec
from .display import aligned
from .local_run import admit, with_progress
from .spec_options import Flag, Group, Row, SpecOption, Switch, add_rows, spec_values


def _task_names(value: str) -> list[str]:
    """Comma-separated task names; ``paper`` stands for the paper's seven."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    return [n for n in names if n != "paper"] + (
        list(PAPER_TASK_METRICS) if "paper" in names else []
    )


EVAL_ROWS: tuple[Row, ...] = (
    SpecOption("model", keywords={"required": True}),
    SpecOption("compare_with"),
    Group(
        "perplexity",
        (
            SpecOption(
                "perplexity.datasets",
                "--ppl",
                help="comma-separated, repeatable:",
                keywords={"action": "extend"},
            ),
            SpecOption("perplexity.seq_len"),
            SpecOption("perplexity.bos_every_window"),
            SpecOption("perplexity.field", "--ppl-field"),
            SpecOption("perplexity.batch_size", "--ppl-batch-size"),
            SpecOption("perplexity.max_windows"),
        ),
    ),
    Group(
        "zero-shot (lm-evaluation-harness)",
        (
            SpecOption(
                "zero_shot.tasks",
                help="comma-separated task names; 'paper' for the paper's seven",
                keywords={"type": _task_names},
            ),
            SpecOption("zero_shot.task_include_path"),
            SpecOption("zero_shot.limit"),
            SpecOption("zero_shot.num_fewshot"),
            SpecOption("zero_shot.batch_size", "--eval-batch-size"),
        ),
    ),
    Group(
        "efficiency",
        (
            Switch(
                "--efficiency",
                {"efficiency": {}},
                help="measure generation latency, throughput and memory",
            ),
            SpecOption("efficiency.batch_sizes"),
            SpecOption("efficiency.output_lengths"),
            SpecOption("efficiency.input_length"),
            SpecOption("efficiency.repeats"),
            SpecOption("efficiency.warmup"),
            Switch(
                "--greedy",
                {"efficiency.do_sample": False},
                help="greedy decoding instead of the paper's sampling",
            ),
        ),
    ),
    Group(
        "next-token agreement with --compare-with",
        (
            SpecOption("agreement.prompts", "--agreement", help="held-out prompts:"),
            SpecOption("agreement.field", "--agreement-field"),
            SpecOption("agreement.max_prompts"),
            SpecOption("agreement.max_tokens", "--agreement-max-tokens"),
            SpecOption("agreement.batch_size", "--agreement-batch-size"),
            Switch(
                "--agreement-plain",
                {"agreement.chat_template": False},
                help="compare on the prompts as plain text, not through the chat template",
            ),
        ),
    ),
    SpecOption("device"),
    SpecOption("dtype"),
    Flag(
        ("--output",),
        {"type": Path, "help": "write report.json to this new or empty directory"},
    ),
    Flag(
        ("--baseline-cache",),
        {
            "type": Path,
            "metavar": "DIR",
            "help": "reuse the --compare-with model's results kept in DIR (same content and "
            "settings) and keep new ones there",
        },
    ),
)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy and generation speed; optionally against a parent model",
    )
    add_rows(p, EvalSpec, EVAL_ROWS)
    p.set_defaults(handler=_eval)


def eval_spec(args: argparse.Namespace) -> EvalSpec:
    """The spec of ``shortened eval``: the options given, the spec's defaults for the rest."""
    return EvalSpec.model_validate(spec_values(EVAL_ROWS, args))


def _eval(args: argparse.Namespace) -> int:
    spec = eval_spec(args)
    admit("eval", spec)
    from shortened.engine.baseline_cache import DirectoryBaselineCache
    from shortened.engine.evaluate import evaluate_model

    cache = DirectoryBaselineCache(args.baseline_cache) if args.baseline_cache else None
    report = with_progress(evaluate_model, spec, args.output, baseline_cache=cache)
    print(_eval_summary(report))
    if args.output:
        print(f"saved to {args.output}")
    return 0


def _eval_summary(report: dict[str, Any]) -> str:
    """The report as plain tables: the model's results and, when compared, the baseline's and
    the deltas ``compare_results`` stored in the report."""
    model, baseline, deltas = report["model"], report["baseline"], report["deltas"]
    compare = ["baseline", "delta"] if deltas is not None else []
    params_rows = [
        [role, result["source"], result["num_layers"], result["params"], result["weight_bytes"]]
        for role, result in (("model", model), ("baseline", baseline))
        if result is not None
    ]
    sections = [aligned(["", "source", "layers", "params", "weight bytes"], params_rows)]
    if "perplexity" in model:
        rows = []
        for name, result in model["perplexity"].items():
            delta = deltas["perplexity"][name] if compare else {}
            rows.append([name, result["windows"], result["ppl"], *_compared(delta, compare)])
        sections.append(aligned(["perplexity", "windows", "model", *compare], rows))
    if "zero_shot" in model:
        rows = []
        for task, result in model["zero_shot"]["tasks"].items():
            delta = deltas["zero_shot"]["tasks"][task] if compare else {}
            rows.append([task, result["metric"], result["value"], *_compared(delta, compare)])
        mean = deltas["zero_shot"]["mean_accuracy"] if compare else {}
        rows.append(["mean", "", model["zero_shot"]["mean_accuracy"], *_compared(mean, compare)])
        sections.append(aligned(["task", "metric", "model", *compare], rows))
    if "efficiency" in model:
        sections.append(_efficiency_table(model, baseline, deltas))
    if agreement := report.get("agreement"):
        rows = [
            [agreement["prompts"], agreement["positions"], agreement["top1"], agreement["mean_kl"]]
        ]
        sections.append(aligned(["agreement", "positions", "top-1", "mean KL"], rows))
    if (report.get("baseline_cache") or {}).get("reused"):
        sections.append(f"baseline results reused from {report['baseline_cache']['location']}")
    return "\n\n".join(sections)


def _compared(delta: dict[str, Any], columns: list[str]) -> list[Any]:
    return [delta[column] for column in columns]


def _efficiency_table(
    model: dict[str, Any], baseline: dict[str, Any] | None, deltas: dict[str, Any] | None
) -> str:
    runs = model["efficiency"]["runs"]
    # The baseline's own latency, and the speed-up the report's deltas give for each run.
    compared = (
        [
            [base["latency_s_mean"], delta["latency_speedup"]]
            for base, delta in zip(
                baseline["efficiency"]["runs"], deltas["efficiency"], strict=True
            )
        ]
        if baseline is not None and deltas is not None
        else [[] for _ in runs]
    )
    rows = [
        [
            run["batch_size"],
            run["input_length"],
            run["output_length"],
            run["latency_s_mean"],
            run["throughput_tokens_per_s_mean"],
            run["peak_memory_bytes"] / 2**20,
            *against,
        ]
        for run, against in zip(runs, compared, strict=True)
    ]
    memory = (
        "peak MiB (GPU)"
        if model["efficiency"]["peak_memory_kind"].startswith("cuda")
        else "peak MiB (RSS)"
    )
    speed = ["baseline s", "speed-up"] if deltas is not None else []
    return aligned(["batch", "in", "out", "latency s", "tokens/s", memory, *speed], rows)
