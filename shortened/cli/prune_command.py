"""``shortened prune``: score blocks, remove the least important and save the checkpoint, in
this process (no service involved). Its options are one table of rows over ``PruneSpec``;
``PRUNING_ROWS`` (calibration data, protection, how scoring runs, the output and the score
cache) are shared with ``shortened search``; ``--keep-experts`` / ``--keep-expert-fraction``
(the spec's ``expert_pruning``) are prune's own."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..planning import render_plan
from ..specs import DATA_FREE_CRITERIA, PruneSpec, calibration_needed
from .local_run import admit, dry_run_plan, refuse, with_progress
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

PRUNING_ROWS: tuple[Row, ...] = (
    SpecOption("calibration.source", "--calibration", help="calibration data:"),
    SpecOption("calibration.dataset", "--calibration-dataset", help="instead of a file:"),
    SpecOption("calibration.split", "--calibration-split"),
    SpecOption("calibration.field", "--calibration-field"),
    SpecOption("calibration.n_samples"),
    SpecOption("calibration.seq_len"),
    SpecOption("calibration.seed"),
    SpecOption("calibration.add_bos_to_every"),
    SpecOption("calibration.sampling"),
    SpecOption("calibration.chat_template", "--calibration-chat-template"),
    SpecOption("protect_first"),
    SpecOption("protect_last"),
    SpecOption("ratio_of"),
    Switch(
        "--no-protect", {"protect_first": 0, "protect_last": 0}, help="allow removing any block"
    ),
    SpecOption("batch_size"),
    SpecOption("taylor_batch_size"),
    SpecOption("device"),
    SpecOption("dtype"),
    SpecOption("max_shard_size"),
    *QUALITY_GATE_ROWS,
    Flag(
        ("--dry-run",),
        {
            "action": "store_true",
            "help": "print the plan (parameters, blocks, output size, peak memory per stage) and exit",
        },
    ),
    Flag(
        ("--output",), {"type": Path, "help": "new or empty directory (required unless --dry-run)"}
    ),
    Flag(
        ("--score-cache",),
        {
            "type": Path,
            "metavar": "DIR",
            "help": "reuse block scores kept in DIR (same model content, criterion, calibration) "
            "and add new ones",
        },
    ),
)

PRUNE_ROWS: tuple[Row, ...] = (
    SpecOption("model", keywords={"required": True}),
    SpecOption("criterion"),
    Group(
        None,
        (SpecOption("num_blocks"), SpecOption("target_ratio", "--ratio")),
        exclusive=True,
        required=True,
    ),
    Group(
        None,
        (
            SpecOption(
                "expert_pruning.keep_experts",
                "--keep-experts",
                help="mixture of experts, after block removal:",
                keywords={"metavar": "N"},
            ),
            SpecOption(
                "expert_pruning.keep_fraction",
                "--keep-expert-fraction",
                help="mixture of experts, after block removal:",
                keywords={"metavar": "F"},
            ),
        ),
        exclusive=True,
    ),
    *PRUNING_ROWS,
)


def add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="score blocks, remove the least important, save a checkpoint")
    add_rows(p, PruneSpec, PRUNE_ROWS)
    p.set_defaults(handler=_prune)


def prune_spec(args: argparse.Namespace) -> PruneSpec:
    """The spec of ``shortened prune``: the options given, the spec's defaults for the rest."""
    values = spec_values(PRUNE_ROWS, args)
    calibration = values.get("calibration", {})
    if "source" not in calibration and "dataset" not in calibration:
        criterion = values.get("criterion", PruneSpec.model_fields["criterion"].default)
        if criterion not in DATA_FREE_CRITERIA:
            hint = "pass --calibration FILE or --calibration-dataset NAME"
            refuse("calibration", f"{calibration_needed(criterion)}; {hint}")
        values.pop("calibration", None)
    return PruneSpec.model_validate(values)


def _prune(args: argparse.Namespace) -> int:
    spec = prune_spec(args)
    admit("prune", spec)
    if args.dry_run:
        print(render_plan(dry_run_plan("prune", spec)))
        return 0
    if args.output is None:
        refuse("output", "--output is required (unless --dry-run)")
    from shortened.engine.prune import prune_model
    from shortened.engine.score_cache import DirectoryScoreCache

    cache = DirectoryScoreCache(args.score_cache) if args.score_cache else None
    report = with_progress(prune_model, spec, args.output, score_cache=cache)
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
    if experts := report.get("expert_pruning"):
        lines.append(
            f"expert pruning: {experts['experts_before']} -> {experts['experts_after']} "
            "routed experts per MoE block (the least routed on the calibration text removed)"
        )
    if cache := report.get("score_cache"):
        lines.append(
            f"score cache: {cache['reused_scores']} block scores reused, "
            f"{cache['computed_scores']} computed ({cache['location']})"
        )
    return "\n".join(lines)
