"""``shortened export``: a (pruned) checkpoint as the artifacts teams serve — GGUF files for
llama.cpp and Ollama, quantized checkpoints for vLLM and TGI — each in its own subdirectory,
loaded and measured in its own runtime before the command succeeds. Its options are one
table of rows over ``ExportSpec``.

shortened export --model DIR --target gguf:q4_k_m --target hf-quantized:w4a16
    [--calibration FILE] [--ppl FILE] [--compare-with PARENT] --output DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..render import EXPORT_COLUMNS, export_rows
from ..specs import ExportSpec, parse_target
from .display import aligned
from .local_run import admit, with_progress
from .spec_options import Flag, Group, Row, SpecOption, add_rows, spec_values


def _target(value: str) -> dict[str, str]:
    try:
        return parse_target(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


EXPORT_ROWS: tuple[Row, ...] = (
    SpecOption("model", keywords={"required": True}),
    SpecOption(
        "targets",
        "--target",
        help="FORMAT:TYPE, repeatable (gguf:f16, gguf:q8_0, gguf:q4_k_m, gguf:source for a "
        "model pruned from a GGUF file, hf-quantized:w4a16, hf-quantized:int8-w8a8, ...):",
        keywords={"type": _target, "action": "append", "required": True, "metavar": "FORMAT:TYPE"},
    ),
    SpecOption("compare_with"),
    Group(
        "calibration (calibrated schemes: w4a16, w8a16, int8-w8a8)",
        (
            SpecOption("calibration.source", "--calibration", help="calibration data:"),
            SpecOption("calibration.dataset", "--calibration-dataset", help="instead of a file:"),
            SpecOption("calibration.field", "--calibration-field"),
            SpecOption("quantization.iters", "--quant-iters"),
            SpecOption("quantization.n_samples", "--quant-samples"),
            SpecOption("quantization.seq_len", "--quant-seq-len"),
            SpecOption("quantization.batch_size", "--quant-batch-size"),
        ),
    ),
    Group(
        "perplexity of every artifact",
        (
            SpecOption(
                "perplexity.datasets",
                "--ppl",
                help="comma-separated, repeatable:",
                keywords={"action": "extend"},
            ),
            SpecOption("perplexity.seq_len"),
            SpecOption("perplexity.max_windows"),
            SpecOption("perplexity.field", "--ppl-field"),
        ),
    ),
    Flag(("--output",), {"type": Path, "required": True, "help": "a new or empty directory"}),
)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="GGUF files and quantized checkpoints, each verified in its own runtime",
    )
    add_rows(p, ExportSpec, EXPORT_ROWS)
    p.set_defaults(handler=_export)


def export_spec(args: argparse.Namespace) -> ExportSpec:
    """The spec of ``shortened export``: the options given, the spec's defaults for the rest."""
    return ExportSpec.model_validate(spec_values(EXPORT_ROWS, args))


def _export(args: argparse.Namespace) -> int:
    spec = export_spec(args)
    admit("export", spec)
    from shortened.engine.export.job import export_job

    report = with_progress(export_job, spec, args.output)
    print(export_summary(report))
    print(f"wrote {args.output}/")
    return 0


def export_summary(report: dict[str, Any]) -> str:
    """The artifacts as a table (the report page's columns)."""
    rows = export_rows(report)
    # The vLLM column only where an artifact is a vLLM format.
    columns = [(k, h) for k, h in EXPORT_COLUMNS if k != "vllm" or any(r[k] != "-" for r in rows)]
    return aligned([heading for _, heading in columns], [[r[k] for k, _ in columns] for r in rows])
