"""``shortened search``: choose the pruning for a budget in this process, no service involved.

Every criterion asked for (default: the one-shot ones) at every block count the budget
admits is evaluated on held-out calibration documents; the best is pruned and saved like
``shortened prune`` saves, and the ranked candidates are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..specs import SearchSpec
from .local_run import admit, with_progress
from .prune_command import PRUNING_ROWS
from .spec_options import Flag, Group, Row, SpecOption, add_rows, spec_values


def _block_range(value: str) -> dict[str, int]:
    low, sep, high = value.partition("-")
    try:
        return {"min": int(low), "max": int(high if sep else low)}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {value!r}") from exc


SEARCH_ROWS: tuple[Row, ...] = (
    SpecOption("model", keywords={"required": True}),
    SpecOption("criteria", help="comma-separated criteria to try:"),
    Group(
        None,
        (
            SpecOption("target_ratio", "--ratio"),
            SpecOption(
                "num_blocks",
                help="N or MIN-MAX:",
                keywords={"type": _block_range, "metavar": "MIN-MAX"},
            ),
            SpecOption("min_speedup"),
        ),
        exclusive=True,
        required=True,
    ),
    SpecOption("validation.fraction", "--validation-fraction"),
    SpecOption("validation.seed", "--validation-seed"),
    SpecOption("validation.max_windows", "--validation-windows"),
    *PRUNING_ROWS,
    Flag(
        ("--json",), {"action": "store_true", "help": "print the report's search section as JSON"}
    ),
)


def add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="try criteria x block counts within a budget, prune with the best on held-out data",
    )
    add_rows(p, SearchSpec, SEARCH_ROWS)
    p.set_defaults(handler=_search)


def search_spec(args: argparse.Namespace) -> SearchSpec:
    """The spec of ``shortened search``: the options given, the spec's defaults for the rest."""
    return SearchSpec.model_validate({"calibration": {}, **spec_values(SEARCH_ROWS, args)})


def _search(args: argparse.Namespace) -> int:
    spec = search_spec(args)
    admit("search", spec)
    from shortened.engine.score_cache import DirectoryScoreCache
    from shortened.engine.search import search_model

    cache = DirectoryScoreCache(args.score_cache) if args.score_cache else None
    report = with_progress(search_model, spec, args.output, score_cache=cache)
    print(json.dumps(report["search"], indent=2) if args.json else search_summary(report))
    print(f"saved to {args.output}")
    return 0


def search_summary(report: dict[str, Any]) -> str:
    from ..render import ranking_markdown

    search = report["search"]
    best = search["best"]
    return "\n".join(
        [
            f"{len(search['ranking'])} candidates ({', '.join(search['criteria'])} x "
            f"{search['block_counts']} blocks), ranked by perplexity on "
            f"{search['validation']['windows'][0]} held-out windows:",
            "",
            ranking_markdown(search),
            f"best: {'/'.join(best['criteria'])} removing blocks {best['removed_blocks']} "
            f"({report['num_layers_before']} -> {report['num_layers_after']} layers, "
            f"{report['params_before']:,} -> {report['params_after']:,} params, "
            f"estimated speed-up {best['estimated_speedup']:.3g}x), "
            f"validation perplexity {best['validation_ppl']:.4g}",
        ]
    )
