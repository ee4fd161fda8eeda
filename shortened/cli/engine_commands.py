"""``shortened prune|retrain|eval``: the engine run in this process, no service involved."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..planning import Plan, plan_job, render_plan
from ..specs import (
    DATA_FREE_CRITERIA,
    PAPER_TASK_METRICS,
    CalibrationSpec,
    CptSpec,
    EfficiencySpec,
    EvalSpec,
    KdSpec,
    LoraSpec,
    PerplexitySpec,
    PruneSpec,
    RetrainSpec,
    TrainDataSpec,
    ZeroShotSpec,
    calibration_needed,
)
from .display import TerminalProgress, aligned
from .spec_options import given, spec_option

MODEL_HELP = "local dir, s3://bucket/prefix/, hf://org/name[@rev]"


def admit(kind: str, spec: Any) -> None:
    """Refuse a job that cannot run before torch or the model is loaded (``AdmissionError``:
    one line naming the field). Object storage is asked with a short timeout."""
    from ..admission import Lookups, check_spec, s3_lookups

    lookups = s3_lookups() if "s3://" in spec.model_dump_json() else Lookups()
    check_spec(kind, spec, lookups)


def dry_run_plan(kind: str, spec: Any) -> Plan:
    """The plan of ``spec`` from its model's config.json, without torch. ``device auto``
    is planned for the CPU unless CUDA_VISIBLE_DEVICES names a GPU."""
    import os

    from ..admission import AdmissionError, Lookups, Problem, model_config, s3_lookups

    lookups = s3_lookups() if spec.model.startswith("s3://") else Lookups()
    config = model_config(spec.model, lookups)
    if config is None:
        raise AdmissionError(
            [Problem("model", f"cannot plan {spec.model}: its config.json is not readable here")]
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    auto_device = "cuda" if visible and visible != "-1" else "cpu"
    return plan_job(kind, spec, config, auto_device)


def add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="score blocks, remove the least important, save a checkpoint")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    spec_option(p, PruneSpec, "criterion")
    target = p.add_mutually_exclusive_group(required=True)
    spec_option(target, PruneSpec, "num_blocks")
    spec_option(target, PruneSpec, "target_ratio", "--ratio")
    add_pruning_options(p)
    p.set_defaults(handler=_prune)


def add_pruning_options(p: argparse.ArgumentParser) -> None:
    """The options ``prune`` and ``search`` share: calibration data, protection, how scoring
    runs, the output and the score cache."""
    spec_option(p, CalibrationSpec, "source", "--calibration", help="calibration data:")
    spec_option(p, CalibrationSpec, "dataset", "--calibration-dataset", help="instead of a file:")
    spec_option(p, CalibrationSpec, "split", "--calibration-split")
    spec_option(p, CalibrationSpec, "field", "--calibration-field")
    spec_option(p, CalibrationSpec, "n_samples")
    spec_option(p, CalibrationSpec, "seq_len")
    spec_option(p, CalibrationSpec, "seed")
    spec_option(p, CalibrationSpec, "add_bos_to_every")
    spec_option(p, CalibrationSpec, "sampling")
    spec_option(p, PruneSpec, "protect_first")
    spec_option(p, PruneSpec, "protect_last")
    p.add_argument("--no-protect", action="store_true", help="allow removing any block")
    spec_option(p, PruneSpec, "batch_size")
    spec_option(p, PruneSpec, "taylor_batch_size")
    spec_option(p, PruneSpec, "device")
    spec_option(p, PruneSpec, "dtype")
    spec_option(p, PruneSpec, "max_shard_size")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (parameters, blocks, output size, peak memory per stage) and exit",
    )
    p.add_argument("--output", type=Path, help="new or empty directory (required unless --dry-run)")
    p.add_argument(
        "--score-cache",
        type=Path,
        metavar="DIR",
        help="reuse block scores kept in DIR (same model content, criterion, calibration) and add new ones",
    )


def calibration_options(args: argparse.Namespace) -> dict[str, Any]:
    """The calibration section from the options given (the spec's defaults for the rest)."""
    return given(
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


def shared_options(args: argparse.Namespace) -> dict[str, Any]:
    """Protection and scoring options given to ``prune`` or ``search``."""
    protection = (
        {"protect_first": 0, "protect_last": 0}
        if args.no_protect
        else given(protect_first=args.protect_first, protect_last=args.protect_last)
    )
    return {
        **protection,
        **given(
            batch_size=args.batch_size,
            taylor_batch_size=args.taylor_batch_size,
            device=args.device,
            dtype=args.dtype,
        ),
    }


def prune_spec(args: argparse.Namespace) -> PruneSpec:
    """The spec of ``shortened prune``: the options given, the spec's defaults for the rest."""
    calibration: dict[str, Any] | None = calibration_options(args)
    criterion = args.criterion or PruneSpec.model_fields["criterion"].default
    if args.calibration is None and args.calibration_dataset is None:
        if criterion not in DATA_FREE_CRITERIA:
            from ..admission import AdmissionError, Problem

            hint = "pass --calibration FILE or --calibration-dataset NAME"
            raise AdmissionError(
                [Problem("calibration", f"{calibration_needed(criterion)}; {hint}")]
            )
        calibration = None
    return PruneSpec.model_validate(
        {
            "model": args.model,
            "calibration": calibration,
            **shared_options(args),
            **given(
                criterion=args.criterion,
                num_blocks=args.num_blocks,
                target_ratio=args.ratio,
                max_shard_size=args.max_shard_size,
            ),
        }
    )


def _prune(args: argparse.Namespace) -> int:
    spec = prune_spec(args)
    admit("prune", spec)
    if args.dry_run:
        print(render_plan(dry_run_plan("prune", spec)))
        return 0
    if args.output is None:
        from ..admission import AdmissionError, Problem

        raise AdmissionError([Problem("output", "--output is required (unless --dry-run)")])
    from shortened.engine.prune import prune_model
    from shortened.engine.score_cache import DirectoryScoreCache

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
    from ..render import block_score_chart

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


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _ints(value: str) -> list[int]:
    try:
        return [int(item) for item in _csv(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {value!r}"
        ) from exc


def add_retrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="retrain a (pruned) model: LoRA, continued pretraining, both, or distillation",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    spec_option(p, RetrainSpec, "method")
    data = p.add_argument_group("data (LoRA data; also the CPT corpus unless --cpt-data)")
    spec_option(data, TrainDataSpec, "source", "--data", help="training data:")
    spec_option(data, TrainDataSpec, "dataset", "--data-dataset", help="instead of a file:")
    spec_option(data, TrainDataSpec, "dataset_config", "--data-config")
    spec_option(data, TrainDataSpec, "split", "--data-split")
    spec_option(data, TrainDataSpec, "streaming")
    spec_option(data, TrainDataSpec, "format")
    spec_option(data, TrainDataSpec, "field")
    spec_option(data, TrainDataSpec, "train_on_inputs")
    spec_option(data, TrainDataSpec, "max_records")
    spec_option(data, TrainDataSpec, "validation_fraction")
    spec_option(data, TrainDataSpec, "validation_size")
    spec_option(data, TrainDataSpec, "validation_source", "--validation-data")
    lora = p.add_argument_group("LoRA (defaults: the paper's)")
    spec_option(lora, LoraSpec, "r", "--lora-r")
    spec_option(lora, LoraSpec, "alpha", "--lora-alpha")
    spec_option(lora, LoraSpec, "dropout", "--lora-dropout")
    spec_option(
        lora, LoraSpec, "target_modules", "--lora-targets", type=_csv, help="comma-separated names"
    )
    lora.add_argument("--no-merge", action="store_true", help="save the adapter only")
    cpt = p.add_argument_group("continued pretraining (cpt, cpt_lora)")
    cpt.add_argument("--cpt-data", help="CPT corpus file or URI (default: --data)")
    cpt.add_argument("--cpt-dataset", help="CPT corpus as an HF dataset id (streamed)")
    cpt.add_argument("--cpt-dataset-config")
    spec_option(cpt, CptSpec, "max_steps", "--cpt-max-steps")
    spec_option(cpt, CptSpec, "max_tokens", "--cpt-max-tokens")
    spec_option(cpt, CptSpec, "learning_rate", "--cpt-lr")
    spec_option(cpt, CptSpec, "warmup_steps", "--cpt-warmup-steps")
    spec_option(cpt, CptSpec, "seq_len", "--cpt-seq-len")
    kd = p.add_argument_group(
        "knowledge distillation from the parent (kd; alpha and temperature: Minitron's)"
    )
    spec_option(kd, KdSpec, "teacher", "--teacher", help="teacher model directory or URI:")
    spec_option(kd, KdSpec, "alpha", "--kd-alpha")
    spec_option(kd, KdSpec, "temperature", "--kd-temperature")
    spec_option(kd, KdSpec, "max_steps", "--kd-max-steps")
    spec_option(kd, KdSpec, "max_tokens", "--kd-max-tokens")
    spec_option(kd, KdSpec, "learning_rate", "--kd-lr")
    spec_option(kd, KdSpec, "warmup_steps", "--kd-warmup-steps")
    spec_option(kd, KdSpec, "seq_len", "--kd-seq-len")
    spec_option(kd, KdSpec, "chunk_size", "--kd-chunk-size")
    spec_option(kd, KdSpec, "lora", "--kd-lora", help="with the --lora-* settings:")
    train = p.add_argument_group("training")
    spec_option(train, RetrainSpec, "learning_rate", "--lr", help="LoRA stage.")
    spec_option(train, RetrainSpec, "epochs")
    spec_option(train, RetrainSpec, "micro_batch_size")
    spec_option(train, RetrainSpec, "batch_size")
    spec_option(train, RetrainSpec, "cutoff_len")
    spec_option(train, RetrainSpec, "warmup_steps")
    spec_option(train, RetrainSpec, "max_steps")
    spec_option(train, RetrainSpec, "save_steps")
    spec_option(train, RetrainSpec, "eval_steps")
    spec_option(train, RetrainSpec, "logging_steps")
    spec_option(train, RetrainSpec, "gradient_checkpointing", action=argparse.BooleanOptionalAction)
    train.add_argument(
        "--checkpoint-dir", type=Path, help="Trainer checkpoints (resumed from when present)"
    )
    train.add_argument(
        "--no-resume",
        action="store_true",
        help="start over even if --checkpoint-dir has checkpoints",
    )
    spec_option(train, RetrainSpec, "seed")
    spec_option(train, RetrainSpec, "device")
    spec_option(train, RetrainSpec, "dtype")
    spec_option(train, RetrainSpec, "max_shard_size")
    p.add_argument("--output", required=True, type=Path, help="new or empty directory")
    p.set_defaults(handler=_retrain)


def retrain_spec(args: argparse.Namespace) -> RetrainSpec:
    """The spec of ``shortened retrain``: the options given, the spec's defaults for the rest."""

    def data_spec(
        source: str | None, dataset: str | None, config: str | None, **extra: Any
    ) -> dict[str, Any]:
        return given(
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
    cpt = given(
        max_steps=args.cpt_max_steps,
        max_tokens=args.cpt_max_tokens,
        learning_rate=args.cpt_lr,
        warmup_steps=args.cpt_warmup_steps,
        seq_len=args.cpt_seq_len,
    )
    if args.cpt_data or args.cpt_dataset:
        cpt["data"] = given(
            source=args.cpt_data,
            dataset=args.cpt_dataset,
            dataset_config=args.cpt_dataset_config,
            streaming=True if args.cpt_dataset else None,
            format="text" if args.cpt_data is None else None,
        )
    kd = given(
        teacher=args.teacher,
        alpha=args.kd_alpha,
        temperature=args.kd_temperature,
        max_steps=args.kd_max_steps,
        max_tokens=args.kd_max_tokens,
        learning_rate=args.kd_lr,
        warmup_steps=args.kd_warmup_steps,
        seq_len=args.kd_seq_len,
        chunk_size=args.kd_chunk_size,
        lora=args.kd_lora,
    )
    lora = given(
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=args.lora_targets,
        merge=False if args.no_merge else None,
    )
    return RetrainSpec.model_validate(
        {
            "model": args.model,
            "data": data,
            "lora": lora,
            "cpt": cpt or None,
            "kd": kd or None,
            **given(
                method=args.method,
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
                max_shard_size=args.max_shard_size,
            ),
        }
    )


def _retrain(args: argparse.Namespace) -> int:
    spec = retrain_spec(args)
    admit("retrain", spec)
    from shortened.engine.retrain import retrain_model

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
    table = aligned(
        ["stage", "steps", "batch", "lr", "train loss", "eval loss", "trainable", "time s"], rows
    )
    outputs = ", ".join(f"{k}: {v}" for k, v in report["outputs"].items())
    return f"{report['method']} on {report['model']} ({report['params']:,} params, {report['precision']})\n{table}\noutputs: {outputs}"


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy and generation speed; optionally against a parent model",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    spec_option(p, EvalSpec, "compare_with")
    ppl = p.add_argument_group("perplexity")
    ppl.add_argument(
        "--ppl",
        type=_csv,
        action="extend",
        help="wikitext2, ptb, or a text file / URI (comma-separated, repeatable)",
    )
    spec_option(ppl, PerplexitySpec, "seq_len")
    spec_option(ppl, PerplexitySpec, "bos_every_window")
    spec_option(ppl, PerplexitySpec, "field", "--ppl-field")
    spec_option(ppl, PerplexitySpec, "batch_size", "--ppl-batch-size")
    spec_option(ppl, PerplexitySpec, "max_windows")
    zero_shot = p.add_argument_group("zero-shot (lm-evaluation-harness)")
    zero_shot.add_argument(
        "--tasks", type=_csv, help="comma-separated task names; 'paper' for the paper's seven"
    )
    spec_option(zero_shot, ZeroShotSpec, "task_include_path")
    spec_option(zero_shot, ZeroShotSpec, "limit")
    spec_option(zero_shot, ZeroShotSpec, "num_fewshot")
    spec_option(zero_shot, ZeroShotSpec, "batch_size", "--eval-batch-size")
    efficiency = p.add_argument_group("efficiency")
    efficiency.add_argument(
        "--efficiency",
        action="store_true",
        help="measure generation latency, throughput and memory",
    )
    spec_option(efficiency, EfficiencySpec, "batch_sizes", type=_ints)
    spec_option(efficiency, EfficiencySpec, "output_lengths", type=_ints)
    spec_option(efficiency, EfficiencySpec, "input_length")
    spec_option(efficiency, EfficiencySpec, "repeats")
    spec_option(efficiency, EfficiencySpec, "warmup")
    efficiency.add_argument(
        "--greedy", action="store_true", help="greedy decoding instead of the paper's sampling"
    )
    spec_option(p, EvalSpec, "device")
    spec_option(p, EvalSpec, "dtype")
    p.add_argument("--output", type=Path, help="write report.json to this new or empty directory")
    p.add_argument(
        "--baseline-cache",
        type=Path,
        metavar="DIR",
        help="reuse the --compare-with model's results kept in DIR (same content and settings)"
        " and keep new ones there",
    )
    p.set_defaults(handler=_eval)


def eval_spec(args: argparse.Namespace) -> EvalSpec:
    """The spec of ``shortened eval``: the options given, the spec's defaults for the rest."""
    perplexity = given(
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
    zero_shot = given(
        tasks=tasks,
        task_include_path=args.task_include_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.eval_batch_size,
    )
    efficiency = given(
        batch_sizes=args.batch_sizes,
        output_lengths=args.output_lengths,
        input_length=args.input_length,
        repeats=args.repeats,
        warmup=args.warmup,
        do_sample=False if args.greedy else None,
    )
    return EvalSpec.model_validate(
        {
            "model": args.model,
            "compare_with": args.compare_with,
            "perplexity": perplexity or None,
            "zero_shot": zero_shot or None,
            "efficiency": efficiency if (efficiency or args.efficiency) else None,
            **given(device=args.device, dtype=args.dtype),
        }
    )


def _eval(args: argparse.Namespace) -> int:
    spec = eval_spec(args)
    admit("eval", spec)
    from shortened.engine.evaluate import evaluate_model

    progress = TerminalProgress()
    try:
        from shortened.engine.baseline_cache import DirectoryBaselineCache

        cache = DirectoryBaselineCache(args.baseline_cache) if args.baseline_cache else None
        report = evaluate_model(spec, args.output, progress=progress, baseline_cache=cache)
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
    sections.append(aligned(["", "source", "layers", "params", "weight bytes"], params_rows))
    if "perplexity" in model:
        rows = []
        for name, result in model["perplexity"].items():
            row = [name, result["windows"], result["ppl"]]
            if compare:
                base = baseline["perplexity"][name]["ppl"]
                row += [base, result["ppl"] - base]
            rows.append(row)
        sections.append(
            aligned(
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
            aligned(["task", "metric", "model", *(["baseline", "delta"] if compare else [])], rows)
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
        sections.append(aligned(headers, rows))
    if (report.get("baseline_cache") or {}).get("reused"):
        sections.append(f"baseline results reused from {report['baseline_cache']['location']}")
    return "\n\n".join(sections)
