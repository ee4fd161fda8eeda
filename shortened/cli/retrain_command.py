"""``shortened retrain``: LoRA, continued pretraining, both, or distillation from the parent,
in this process (no service involved). Its options are one table of rows over
``RetrainSpec``.

The training flags without a stage prefix mean the same for every method: ``--max-steps``,
``--max-tokens``, ``--lr`` and ``--warmup-steps`` set every stage the method runs (the LoRA
stage through the spec's top-level fields, a CPT or KD stage through its own section), and
``--cpt-*`` / ``--kd-*`` set one stage's alone, winning over them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..specs import CptSpec, RetrainSpec
from .display import aligned
from .local_run import admit, refuse, with_progress
from .spec_options import (
    QUALITY_GATE_ROWS,
    Flag,
    Group,
    Row,
    SpecOption,
    Switch,
    add_rows,
    spec_values,
)

# The pseudo-section of the options every stage shares, resolved per method by
# ``_fill_stages`` (it is not a field of the spec).
STAGES = "stages"
# The spec sections of the packed-text stages each method runs.
PACKED_STAGES: dict[str, tuple[str, ...]] = {"cpt": ("cpt",), "cpt_lora": ("cpt",), "kd": ("kd",)}
# A packed-text stage's budgets, of which it takes one, in this order of preference.
BUDGETS = ("max_tokens", "max_steps")

RETRAIN_ROWS: tuple[Row, ...] = (
    SpecOption("model", keywords={"required": True}),
    SpecOption("method"),
    Group(
        "data (LoRA data; also the CPT corpus unless --cpt-data)",
        (
            SpecOption("data.source", "--data", help="training data:"),
            SpecOption("data.dataset", "--data-dataset", help="instead of a file:"),
            SpecOption("data.dataset_config", "--data-config"),
            SpecOption("data.split", "--data-split"),
            SpecOption("data.streaming"),
            SpecOption("data.format"),
            SpecOption("data.field"),
            SpecOption("data.train_on_inputs"),
            SpecOption("data.chat_template"),
            SpecOption("data.max_records"),
            SpecOption("data.validation_fraction"),
            SpecOption("data.validation_size"),
            SpecOption("data.validation_source", "--validation-data"),
        ),
    ),
    Group(
        "LoRA (defaults: the paper's)",
        (
            SpecOption("lora.r", "--lora-r"),
            SpecOption("lora.alpha", "--lora-alpha"),
            SpecOption("lora.dropout", "--lora-dropout"),
            SpecOption("lora.target_modules", "--lora-targets", help="comma-separated names"),
            Switch("--no-merge", {"lora.merge": False}, help="save the adapter only"),
        ),
    ),
    Group(
        "continued pretraining (cpt, cpt_lora)",
        (
            SpecOption("cpt.data.source", "--cpt-data", help="CPT corpus (default: --data):"),
            SpecOption(
                "cpt.data.dataset",
                "--cpt-dataset",
                help="CPT corpus as an HF dataset (streamed):",
                implies={"cpt.data.streaming": True, "cpt.data.format": "text"},
            ),
            SpecOption("cpt.data.dataset_config", "--cpt-dataset-config"),
            SpecOption("cpt.data.chat_template", "--cpt-chat-template"),
            SpecOption("cpt.max_steps", "--cpt-max-steps", help="CPT stage only:"),
            SpecOption("cpt.max_tokens", "--cpt-max-tokens", help="CPT stage only:"),
            SpecOption("cpt.learning_rate", "--cpt-lr", help="CPT stage only."),
            SpecOption("cpt.warmup_steps", "--cpt-warmup-steps", help="CPT stage only."),
            SpecOption("cpt.seq_len", "--cpt-seq-len"),
        ),
    ),
    Group(
        "knowledge distillation from the parent (kd; alpha and temperature: Minitron's)",
        (
            SpecOption("kd.teacher", "--teacher", help="teacher model directory or URI:"),
            SpecOption("kd.alpha", "--kd-alpha"),
            SpecOption("kd.temperature", "--kd-temperature"),
            SpecOption("kd.max_steps", "--kd-max-steps", help="KD stage only:"),
            SpecOption("kd.max_tokens", "--kd-max-tokens", help="KD stage only:"),
            SpecOption("kd.learning_rate", "--kd-lr", help="KD stage only."),
            SpecOption("kd.warmup_steps", "--kd-warmup-steps", help="KD stage only."),
            SpecOption("kd.seq_len", "--kd-seq-len"),
            SpecOption("kd.chunk_size", "--kd-chunk-size"),
            SpecOption("kd.lora", "--kd-lora", help="with the --lora-* settings:"),
        ),
    ),
    Group(
        "training (every stage the method runs; --cpt-*/--kd-* set one stage's alone)",
        (
            SpecOption(
                "max_steps",
                help="The CPT/KD stage's budget (unless a token budget or its own is given), and:",
                also=(f"{STAGES}.max_steps",),
            ),
            SpecOption(
                f"{STAGES}.max_tokens",
                "--max-tokens",
                help="Budget of the CPT/KD stage (instead of --max-steps, which then caps it):",
                model=CptSpec,
            ),
            SpecOption(
                "learning_rate",
                "--lr",
                help="Learning rate of every stage.",
                also=(f"{STAGES}.learning_rate",),
            ),
            SpecOption(
                "warmup_steps",
                help="Warm-up steps of every stage.",
                also=(f"{STAGES}.warmup_steps",),
            ),
            SpecOption("epochs"),
            SpecOption("micro_batch_size"),
            SpecOption("batch_size"),
            SpecOption("cutoff_len"),
            SpecOption("save_steps"),
            SpecOption("eval_steps"),
            SpecOption("logging_steps"),
            SpecOption(
                "gradient_checkpointing", keywords={"action": argparse.BooleanOptionalAction}
            ),
            Flag(
                ("--checkpoint-dir",),
                {"type": Path, "help": "Trainer checkpoints (resumed from when present)"},
            ),
            Flag(
                ("--no-resume",),
                {
                    "action": "store_true",
                    "help": "start over even if --checkpoint-dir has checkpoints",
                },
            ),
            SpecOption("seed"),
            SpecOption("device"),
            SpecOption("dtype"),
            SpecOption("max_shard_size"),
            *QUALITY_GATE_ROWS,
        ),
    ),
    Flag(("--output",), {"required": True, "type": Path, "help": "new or empty directory"}),
)


def add_retrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="retrain a (pruned) model: LoRA, continued pretraining, both, or distillation",
    )
    add_rows(p, RetrainSpec, RETRAIN_ROWS)
    p.set_defaults(handler=_retrain)


def retrain_spec(args: argparse.Namespace) -> RetrainSpec:
    """The spec of ``shortened retrain``: the options given, the spec's defaults for the rest."""
    values = spec_values(RETRAIN_ROWS, args)
    _fill_stages(values)
    return RetrainSpec.model_validate(values)


def _fill_stages(values: dict[str, Any]) -> None:
    """Move the options every stage shares into the sections of the packed-text stages the
    method runs, where that stage's own options have not set them. A stage has one budget:
    its own if given, else the shared token budget, else the shared step count (which caps
    every stage anyway, through the spec's top-level ``max_steps``)."""
    shared = values.pop(STAGES, {})
    method = values.get("method", RetrainSpec.model_fields["method"].default)
    sections = PACKED_STAGES.get(method, ())
    if "max_tokens" in shared and not sections:
        refuse("max_tokens", f"--max-tokens applies to methods {', '.join(PACKED_STAGES)}")
    for section in sections:
        stage = values.get(section, {})
        budget = next((name for name in BUDGETS if name in stage), None) or next(
            (name for name in BUDGETS if name in shared), None
        )
        for name, value in shared.items():
            if name not in BUDGETS or name == budget:
                stage.setdefault(name, value)
        if stage:
            values[section] = stage


def _retrain(args: argparse.Namespace) -> int:
    spec = retrain_spec(args)
    admit("retrain", spec)
    from shortened.engine.retrain import retrain_model

    report = with_progress(
        retrain_model,
        spec,
        args.output,
        checkpoint_dir=args.checkpoint_dir,
        resume=not args.no_resume,
    )
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
