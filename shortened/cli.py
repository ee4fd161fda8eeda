"""``shortened``: the command line. One verb per workflow.

    shortened prune --model DIR --criterion ppl --num-blocks 2 --calibration FILE --output OUT
    shortened serve
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
                self.bar = tqdm(total=update.total, unit=f" {update.unit}" if update.unit else "it", file=self.stream, disable=not self.interactive, leave=True, desc=update.stage)
            self.bar.n = update.done
            if update.metrics:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in update.metrics.items()}, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="score blocks, remove the least important, save a checkpoint")
    p.add_argument("--model", required=True, help="local dir, s3://bucket/prefix/, hf://org/name[@rev]")
    p.add_argument("--criterion", default="ppl", choices=CRITERIA)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--num-blocks", type=int, help="number of blocks to remove")
    target.add_argument("--ratio", type=float, help="fraction of parameters to remove")
    p.add_argument("--calibration", help="calibration .txt/.jsonl/.parquet file or s3:// URI")
    p.add_argument("--calibration-dataset", help="HF dataset id instead of a file, e.g. bookcorpus")
    p.add_argument("--calibration-split", default="train")
    p.add_argument("--calibration-field", default="text")
    p.add_argument("--n-samples", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--add-bos-to-every", action="store_true", help="BOS at the start of every window (Gemma)")
    p.add_argument("--protect-first", type=int, default=4)
    p.add_argument("--protect-last", type=int, default=2)
    p.add_argument("--no-protect", action="store_true", help="allow removing any block")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--output", required=True, type=Path, help="new or empty directory")
    p.set_defaults(handler=_prune)


def _prune(args: argparse.Namespace) -> int:
    from .specs import CalibrationSpec, PruneSpec

    spec = PruneSpec(
        model=args.model,
        criterion=args.criterion,
        num_blocks=args.num_blocks,
        target_ratio=args.ratio,
        calibration=CalibrationSpec(
            source=args.calibration,
            dataset=args.calibration_dataset,
            split=args.calibration_split,
            field=args.calibration_field,
            n_samples=args.n_samples,
            seq_len=args.seq_len,
            seed=args.seed,
            add_bos_to_every=args.add_bos_to_every,
        ),
        protect_first=0 if args.no_protect else args.protect_first,
        protect_last=0 if args.no_protect else args.protect_last,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    from worker.engine.prune import prune_model

    progress = TerminalProgress()
    try:
        report = prune_model(spec, args.output, progress=progress)
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
    return "\n".join(lines)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the API and a worker with embedded defaults (SQLite, local artifacts)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from service.serve import serve

    from .config import Settings

    overrides = {k: v for k, v in {"api_host": args.host, "api_port": args.port}.items() if v is not None}
    serve(Settings(**overrides))
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_prune, _add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shortened", description="Depth pruning of LLMs (Shortened LLaMA)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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
