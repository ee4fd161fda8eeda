"""``shortened``: the command line. One verb per workflow.

shortened prune --model DIR --criterion ppl --num-blocks 2 --calibration FILE --output OUT
shortened retrain --model DIR --method lora --data FILE --output OUT [--max-steps N]
shortened eval --model DIR [--compare-with PARENT] --ppl FILE --tasks T1,T2 --efficiency [--output OUT]
shortened serve
shortened jobs submit|get|list|cancel|wait|download ...   (a remote service, see jobs_cli.py)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .specs import CRITERIA


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "spec"
        parts.append(f"{where}: {item['msg']}")
    return "invalid arguments: " + "; ".join(parts)


class TerminalProgress:
    """Stage lines on stderr, and a tqdm bar per unit of work (blocks, steps) on a terminal."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.interactive = stream.isatty()
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, update: Any) -> None:
        from tqdm import tqdm

        if update.stage != self.stage:
            self.close()
            self.stage = update.stage
            message = f" {update.message}" if update.message else ""
            print(f"[{update.stage}]{message}", file=self.stream, flush=True)
        if update.total:
            if self.bar is None or self.bar.total != update.total:
                self.close()
                self.bar = tqdm(
                    total=update.total,
                    unit=f" {update.unit}" if update.unit else "it",
                    file=self.stream,
                    disable=not self.interactive,
                    leave=True,
                    desc=update.stage,
                )
            self.bar.n = update.done
            if update.metrics:
                self.bar.set_postfix(
                    {
                        k: (f"{v:.4g}" if isinstance(v, float) else v)
                        for k, v in update.metrics.items()
                    },
                    refresh=False,
                )
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="score blocks, remove the least important, save a checkpoint")
    p.add_argument(
        "--model", required=True, help="local dir, s3://bucket/prefix/, hf://org/name[@rev]"
    )
    p.add_argument("--criterion", default="ppl", choices=CRITERIA)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--num-blocks", type=int, help="number of blocks to remove")
    target.add_argument("--ratio", type=float, help="fraction of parameters to remove")
    p.add_argument(
        "--calibration",
        help="calibration .txt/.jsonl/.parquet file or s3:// URI (not needed by magnitude)",
    )
    p.add_argument("--calibration-dataset", help="HF dataset id instead of a file, e.g. bookcorpus")
    p.add_argument("--calibration-split", default="train")
    p.add_argument("--calibration-field", default="text")
    p.add_argument("--n-samples", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--add-bos-to-every", action="store_true", help="BOS at the start of every window (Gemma)"
    )
    p.add_argument(
        "--sampling",
        default="paper",
        choices=["paper", "shuffle"],
        help="paper: the paper's windows, token for token (default); shuffle: the earlier scheme",
    )
    p.add_argument("--protect-first", type=int, default=4)
    p.add_argument("--protect-last", type=int, default=2)
    p.add_argument("--no-protect", action="store_true", help="allow removing any block")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--taylor-batch-size", type=int, help="taylor: windows per loss (default all, as the paper)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--output", required=True, type=Path, help="new or empty directory")
    p.add_argument(
        "--score-cache",
        type=Path,
        metavar="DIR",
        help="reuse block scores kept in DIR (same model content, criterion, calibration) and add new ones",
    )
    p.set_defaults(handler=_prune)


def _prune(args: argparse.Namespace) -> int:
    from .specs import DATA_FREE_CRITERIA, CalibrationSpec, PruneSpec, calibration_needed

    calibration = None
    if args.calibration is not None or args.calibration_dataset is not None:
        calibration = CalibrationSpec(
            source=args.calibration,
            dataset=args.calibration_dataset,
            split=args.calibration_split,
            field=args.calibration_field,
            n_samples=args.n_samples,
            seq_len=args.seq_len,
            seed=args.seed,
            add_bos_to_every=args.add_bos_to_every,
            sampling=args.sampling,
        )
    elif args.criterion not in DATA_FREE_CRITERIA:
        hint = "pass --calibration FILE or --calibration-dataset NAME"
        print(
            f"shortened prune: error: {calibration_needed(args.criterion)}; {hint}", file=sys.stderr
        )
        return 2
    spec = PruneSpec(
        model=args.model,
        criterion=args.criterion,
        num_blocks=args.num_blocks,
        target_ratio=args.ratio,
        calibration=calibration,
        protect_first=0 if args.no_protect else args.protect_first,
        protect_last=0 if args.no_protect else args.protect_last,
        batch_size=args.batch_size,
        taylor_batch_size=args.taylor_batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    from worker.engine.prune import prune_model
    from worker.engine.score_cache import DirectoryScoreCache

    cache = DirectoryScoreCache(args.score_cache) if args.score_cache else None
    progress = TerminalProgress()
    try:
        report = prune_model(spec, args.output, progress=progress, score_cache=cache)
    finally:
        progress.close()
    print(_prune_summary(report))
    print(f"saved to {args.output}")
    return 0


def _prune_summary(report: dict[str, Any]) -> str:
    from .render import block_score_chart

    lines = [
        f"criterion {report['criterion']}: removed blocks {report['removed_blocks']} "
        f"({report['num_layers_before']} -> {report['num_layers_after']} layers, "
        f"{report['params_before']:,} -> {report['params_after']:,} params, "
        f"-{100 * report['params_removed_ratio']:.1f}%)",
        block_score_chart(report),
    ]
    if cache := report.get("score_cache"):
        lines.append(
            f"score cache: {cache['reused_scores']} block scores reused, "
            f"{cache['computed_scores']} computed ({cache['location']})"
        )
    return "\n".join(lines)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the API and a worker with embedded defaults (SQLite, local artifacts)"
    )
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from service.serve import serve

    from .config import Settings

    overrides = {
        k: v for k, v in {"api_host": args.host, "api_port": args.port}.items() if v is not None
    }
    serve(Settings(**overrides))
    return 0


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _ints(value: str) -> list[int]:
    try:
        return [int(item) for item in _csv(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {value!r}"
        ) from exc


def _given(**values: Any) -> dict[str, Any]:
    """Only the options the user gave, so the spec's own defaults apply to the rest."""
    return {key: value for key, value in values.items() if value is not None}


def _aligned(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain text table, numbers right-aligned."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _add_retrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain", help="retrain a (pruned) model: LoRA, continued pretraining, or both"
    )
    p.add_argument(
        "--model", required=True, help="local dir, s3://bucket/prefix/, hf://org/name[@rev]"
    )
    p.add_argument("--method", default="lora", choices=["lora", "cpt", "cpt_lora"])
    data = p.add_argument_group("data (LoRA data; also the CPT corpus unless --cpt-data)")
    data.add_argument("--data", help="training .jsonl/.json/.txt/.parquet file or s3:// URI")
    data.add_argument(
        "--data-dataset", help="HF dataset id instead of a file, e.g. yahma/alpaca-cleaned"
    )
    data.add_argument("--data-config", help="HF dataset configuration")
    data.add_argument("--data-split", default=None)
    data.add_argument(
        "--streaming",
        action="store_true",
        default=None,
        help="stream the HF dataset (needs a step budget)",
    )
    data.add_argument("--format", default=None, choices=["auto", "alpaca", "text"])
    data.add_argument("--field", default=None, help="text field of text records (default text)")
    data.add_argument(
        "--train-on-inputs",
        action="store_true",
        default=None,
        help="Alpaca: loss on the prompt too",
    )
    data.add_argument("--max-records", type=int)
    data.add_argument("--validation-fraction", type=float)
    data.add_argument("--validation-size", type=int)
    data.add_argument("--validation-data", help="separate validation file or URI")
    lora = p.add_argument_group("LoRA (defaults: the paper's)")
    lora.add_argument("--lora-r", type=int)
    lora.add_argument("--lora-alpha", type=int)
    lora.add_argument("--lora-dropout", type=float)
    lora.add_argument("--lora-targets", type=_csv, help="comma-separated module names")
    lora.add_argument("--no-merge", action="store_true", help="save the adapter only")
    cpt = p.add_argument_group("continued pretraining (cpt, cpt_lora)")
    cpt.add_argument("--cpt-data", help="CPT corpus file or URI (default: --data)")
    cpt.add_argument("--cpt-dataset", help="CPT corpus as an HF dataset id (streamed)")
    cpt.add_argument("--cpt-dataset-config")
    cpt.add_argument("--cpt-max-steps", type=int)
    cpt.add_argument("--cpt-max-tokens", type=int)
    cpt.add_argument("--cpt-lr", type=float)
    cpt.add_argument("--cpt-warmup-steps", type=int)
    cpt.add_argument("--cpt-seq-len", type=int)
    train = p.add_argument_group("training")
    train.add_argument("--lr", type=float, help="LoRA learning rate (default 1e-4)")
    train.add_argument("--epochs", type=float)
    train.add_argument("--micro-batch-size", type=int)
    train.add_argument("--batch-size", type=int, help="effective batch (default 64)")
    train.add_argument("--cutoff-len", type=int)
    train.add_argument("--warmup-steps", type=int)
    train.add_argument("--max-steps", type=int, help="cap on the steps of each stage")
    train.add_argument("--save-steps", type=int)
    train.add_argument("--eval-steps", type=int)
    train.add_argument("--logging-steps", type=int)
    train.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None
    )
    train.add_argument(
        "--checkpoint-dir", type=Path, help="Trainer checkpoints (resumed from when present)"
    )
    train.add_argument(
        "--no-resume",
        action="store_true",
        help="start over even if --checkpoint-dir has checkpoints",
    )
    train.add_argument("--seed", type=int)
    train.add_argument("--device", default=None)
    train.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--output", required=True, type=Path, help="new or empty directory")
    p.set_defaults(handler=_retrain)


def _retrain(args: argparse.Namespace) -> int:
    from .specs import RetrainSpec

    def data_spec(
        source: str | None, dataset: str | None, config: str | None, **extra: Any
    ) -> dict[str, Any]:
        return _given(
            source=source,
            dataset=dataset,
            dataset_config=config,
            split=args.data_split,
            streaming=args.streaming,
            format=args.format,
            field=args.field,
            **extra,
        )

    data = data_spec(
        args.data,
        args.data_dataset,
        args.data_config,
        train_on_inputs=args.train_on_inputs,
        max_records=args.max_records,
        validation_fraction=args.validation_fraction,
        validation_size=args.validation_size,
        validation_source=args.validation_data,
    )
    cpt = _given(
        max_steps=args.cpt_max_steps,
        max_tokens=args.cpt_max_tokens,
        learning_rate=args.cpt_lr,
        warmup_steps=args.cpt_warmup_steps,
        seq_len=args.cpt_seq_len,
    )
    if args.cpt_data or args.cpt_dataset:
        cpt["data"] = _given(
            source=args.cpt_data,
            dataset=args.cpt_dataset,
            dataset_config=args.cpt_dataset_config,
            streaming=True if args.cpt_dataset else None,
            format="text" if args.cpt_data is None else None,
        )
    lora = _given(
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=args.lora_targets,
        merge=False if args.no_merge else None,
    )
    spec = RetrainSpec.model_validate(
        {
            "model": args.model,
            "method": args.method,
            "data": data,
            "lora": lora,
            "cpt": cpt or None,
            **_given(
                learning_rate=args.lr,
                epochs=args.epochs,
                micro_batch_size=args.micro_batch_size,
                batch_size=args.batch_size,
                cutoff_len=args.cutoff_len,
                warmup_steps=args.warmup_steps,
                max_steps=args.max_steps,
                save_steps=args.save_steps,
                eval_steps=args.eval_steps,
                logging_steps=args.logging_steps,
                gradient_checkpointing=args.gradient_checkpointing,
                seed=args.seed,
                device=args.device,
                dtype=args.dtype,
            ),
        }
    )
    from worker.engine.retrain import retrain_model

    progress = TerminalProgress()
    try:
        report = retrain_model(
            spec,
            args.output,
            progress=progress,
            checkpoint_dir=args.checkpoint_dir,
            resume=not args.no_resume,
        )
    finally:
        progress.close()
    print(_retrain_summary(report))
    print(f"saved to {args.output}")
    return 0


def _retrain_summary(report: dict[str, Any]) -> str:
    rows = [
        [
            s["stage"],
            s["steps"],
            s["effective_batch_size"],
            s["learning_rate"],
            s["train_loss_last"],
            s["eval_loss"],
            s["trainable_params"],
            s["runtime_s"],
        ]
        for s in report["stages"]
    ]
    table = _aligned(
        ["stage", "steps", "batch", "lr", "train loss", "eval loss", "trainable", "time s"], rows
    )
    outputs = ", ".join(f"{k}: {v}" for k, v in report["outputs"].items())
    return f"{report['method']} on {report['model']} ({report['params']:,} params, {report['precision']})\n{table}\noutputs: {outputs}"


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy and generation speed; optionally against a parent model",
    )
    p.add_argument(
        "--model", required=True, help="local dir, s3://bucket/prefix/, hf://org/name[@rev]"
    )
    p.add_argument(
        "--compare-with", help="baseline model (e.g. the unpruned parent), evaluated the same way"
    )
    ppl = p.add_argument_group("perplexity")
    ppl.add_argument(
        "--ppl",
        type=_csv,
        action="extend",
        help="wikitext2, ptb, or a text file / URI (comma-separated, repeatable)",
    )
    ppl.add_argument("--seq-len", type=int)
    ppl.add_argument("--bos-every-window", action="store_true", default=None)
    ppl.add_argument("--ppl-field", help="text field of .jsonl/.parquet files")
    ppl.add_argument("--ppl-batch-size", type=int)
    ppl.add_argument("--max-windows", type=int)
    zero_shot = p.add_argument_group("zero-shot (lm-evaluation-harness)")
    zero_shot.add_argument(
        "--tasks", type=_csv, help="comma-separated task names; 'paper' for the paper's seven"
    )
    zero_shot.add_argument("--task-include-path", help="directory of custom task YAMLs")
    zero_shot.add_argument("--limit", type=float, help="examples per task (testing only)")
    zero_shot.add_argument("--num-fewshot", type=int)
    zero_shot.add_argument("--eval-batch-size", type=int)
    efficiency = p.add_argument_group("efficiency")
    efficiency.add_argument(
        "--efficiency",
        action="store_true",
        help="measure generation latency, throughput and memory",
    )
    efficiency.add_argument("--batch-sizes", type=_ints)
    efficiency.add_argument("--output-lengths", type=_ints)
    efficiency.add_argument("--input-length", type=int)
    efficiency.add_argument("--repeats", type=int)
    efficiency.add_argument("--warmup", type=int)
    efficiency.add_argument(
        "--greedy", action="store_true", help="greedy decoding instead of the paper's sampling"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--output", type=Path, help="write report.json to this new or empty directory")
    p.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    from .specs import PAPER_TASK_METRICS, EvalSpec

    perplexity = _given(
        datasets=args.ppl,
        seq_len=args.seq_len,
        bos_every_window=args.bos_every_window,
        field=args.ppl_field,
        batch_size=args.ppl_batch_size,
        max_windows=args.max_windows,
    )
    tasks = args.tasks
    if tasks is not None and "paper" in tasks:
        tasks = [t for t in tasks if t != "paper"] + list(PAPER_TASK_METRICS)
    zero_shot = _given(
        tasks=tasks,
        task_include_path=args.task_include_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.eval_batch_size,
    )
    efficiency = _given(
        batch_sizes=args.batch_sizes,
        output_lengths=args.output_lengths,
        input_length=args.input_length,
        repeats=args.repeats,
        warmup=args.warmup,
        do_sample=False if args.greedy else None,
    )
    spec = EvalSpec.model_validate(
        {
            "model": args.model,
            "compare_with": args.compare_with,
            "perplexity": perplexity or None,
            "zero_shot": zero_shot or None,
            "efficiency": efficiency if (efficiency or args.efficiency) else None,
            **_given(device=args.device, dtype=args.dtype),
        }
    )
    from worker.engine.evaluate import evaluate_model

    progress = TerminalProgress()
    try:
        report = evaluate_model(spec, args.output, progress=progress)
    finally:
        progress.close()
    print(_eval_summary(report))
    if args.output:
        print(f"saved to {args.output}")
    return 0


def _eval_summary(report: dict[str, Any]) -> str:
    model, baseline = report["model"], report["baseline"]
    compare = baseline is not None
    sections = []
    params_rows = [
        ["model", model["source"], model["num_layers"], model["params"], model["weight_bytes"]]
    ]
    if compare:
        params_rows.append(
            [
                "baseline",
                baseline["source"],
                baseline["num_layers"],
                baseline["params"],
                baseline["weight_bytes"],
            ]
        )
    sections.append(_aligned(["", "source", "layers", "params", "weight bytes"], params_rows))
    if "perplexity" in model:
        rows = []
        for name, result in model["perplexity"].items():
            row = [name, result["windows"], result["ppl"]]
            if compare:
                base = baseline["perplexity"][name]["ppl"]
                row += [base, result["ppl"] - base]
            rows.append(row)
        sections.append(
            _aligned(
                ["perplexity", "windows", "model", *(["baseline", "delta"] if compare else [])],
                rows,
            )
        )
    if "zero_shot" in model:
        rows = []
        for task, result in model["zero_shot"]["tasks"].items():
            row = [task, result["metric"], result["value"]]
            if compare:
                base = baseline["zero_shot"]["tasks"][task]["value"]
                row += [
                    base,
                    None if result["value"] is None or base is None else result["value"] - base,
                ]
            rows.append(row)
        mean = model["zero_shot"]["mean_accuracy"]
        row = ["mean", "", mean]
        if compare:
            base_mean = baseline["zero_shot"]["mean_accuracy"]
            row += [base_mean, None if mean is None or base_mean is None else mean - base_mean]
        rows.append(row)
        sections.append(
            _aligned(["task", "metric", "model", *(["baseline", "delta"] if compare else [])], rows)
        )
    if "efficiency" in model:
        rows = []
        base_runs = (
            baseline["efficiency"]["runs"] if compare else [None] * len(model["efficiency"]["runs"])
        )
        for run, base in zip(model["efficiency"]["runs"], base_runs, strict=True):
            row = [
                run["batch_size"],
                run["input_length"],
                run["output_length"],
                run["latency_s_mean"],
                run["throughput_tokens_per_s_mean"],
                run["peak_memory_bytes"] / 2**20,
            ]
            if base is not None:
                row += [base["latency_s_mean"], base["latency_s_mean"] / run["latency_s_mean"]]
            rows.append(row)
        memory = (
            "peak MiB (GPU)"
            if model["efficiency"]["peak_memory_kind"].startswith("cuda")
            else "peak MiB (RSS)"
        )
        headers = [
            "batch",
            "in",
            "out",
            "latency s",
            "tokens/s",
            memory,
            *(["baseline s", "speed-up"] if compare else []),
        ]
        sections.append(_aligned(headers, rows))
    return "\n\n".join(sections)


def _add_jobs(sub: argparse._SubParsersAction) -> None:
    from .jobs_cli import add_parser  # `shortened jobs ...`: a client of a remote service

    add_parser(sub)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_prune,
    _add_serve,
    _add_retrain,
    _add_eval,
    _add_jobs,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortened", description="Depth pruning of LLMs (Shortened LLaMA)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from worker.engine.errors import EngineError

    try:
        return args.handler(args)
    except ValidationError as exc:
        print(f"shortened {args.command}: error: {_validation_message(exc)}", file=sys.stderr)
    except EngineError as exc:
        print(f"shortened {args.command}: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"shortened {args.command}: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
