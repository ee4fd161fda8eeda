"""``shortened search``: choose the pruning for a budget in this process, no service involved.

Every criterion asked for (default: the one-shot ones) at every block count the budget
admits is evaluated on held-out calibration documents; the best is pruned and saved like
``shortened prune`` saves, and the ranked candidates are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..specs import CRITERIA, SearchSpec, SearchValidationSpec
from .display import TerminalProgress
from .engine_commands import (
    MODEL_HELP,
    add_pruning_options,
    admit,
    calibration_options,
    shared_options,
)
from .spec_options import given, spec_option


def _criteria(value: str) -> list[str]:
    names = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [name for name in names if name not in CRITERIA]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown criteria {unknown or value!r}; choose from {', '.join(CRITERIA)}"
        )
    return names


def _block_range(value: str) -> dict[str, int]:
    low, sep, high = value.partition("-")
    try:
        return {"min": int(low), "max": int(high if sep else low)}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {value!r}") from exc


def add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="try criteria x block counts within a budget, prune with the best on held-out data",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    spec_option(p, SearchSpec, "criteria", type=_criteria, help="comma-separated criteria to try:")
    budget = p.add_mutually_exclusive_group(required=True)
    spec_option(budget, SearchSpec, "target_ratio", "--ratio")
    spec_option(
        budget,
        SearchSpec,
        "num_blocks",
        "--num-blocks",
        type=_block_range,
        metavar="MIN-MAX",
        help="N or MIN-MAX:",
    )
    spec_option(budget, SearchSpec, "min_speedup")
    spec_option(p, SearchValidationSpec, "fraction", "--validation-fraction")
    spec_option(p, SearchValidationSpec, "seed", "--validation-seed")
    spec_option(p, SearchValidationSpec, "max_windows", "--validation-windows")
    add_pruning_options(p)
    p.add_argument("--json", action="store_true", help="print the report's search section as JSON")
    p.set_defaults(handler=_search)


def search_spec(args: argparse.Namespace) -> SearchSpec:
    """The spec of ``shortened search``: the options given, the spec's defaults for the rest."""
    validation = given(
        fraction=args.validation_fraction,
        seed=args.validation_seed,
        max_windows=args.validation_windows,
    )
    return SearchSpec.model_validate(
        {
            "model": args.model,
            "calibration": calibration_options(args),
            "validation": validation,
            **shared_options(args),
            **given(
                criteria=args.criteria,
                target_ratio=args.ratio,
                num_blocks=args.num_blocks,
                min_speedup=args.min_speedup,
            ),
        }
    )


def _search(args: argparse.Namespace) -> int:
    spec = search_spec(args)
    admit("search", spec)
    from shortened.engine.score_cache import DirectoryScoreCache
    from shortened.engine.search import search_model

    cache = DirectoryScoreCache(args.score_cache) if args.score_cache else None
    progress = TerminalProgress()
    try:
        report = search_model(spec, args.output, progress=progress, score_cache=cache)
    finally:
        progress.close()
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
