"""``shortened``: the command line. One verb per workflow.

shortened prune --model DIR --criterion ppl --num-blocks 2 --calibration FILE --output OUT
shortened search --model DIR --calibration FILE --ratio 0.25 [--criteria ppl,taylor] --output OUT
shortened retrain --model DIR --method lora --data FILE --output OUT [--max-steps N]
shortened eval --model DIR [--compare-with PARENT] --ppl FILE --tasks T1,T2 --efficiency [--output OUT]
shortened serve
shortened jobs submit|get|list|cancel|wait|download ...   (a remote service, see jobs.py)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pydantic import ValidationError

from ..admission import AdmissionError
from . import engine_commands, jobs, search_command, serve
from .display import validation_message

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    engine_commands.add_prune,
    search_command.add_search,
    serve.add_serve,
    engine_commands.add_retrain,
    engine_commands.add_eval,
    jobs.add_parser,
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
    from shortened.engine.errors import EngineError

    try:
        return args.handler(args)
    except ValidationError as exc:
        print(f"shortened {args.command}: error: {validation_message(exc)}", file=sys.stderr)
    except (EngineError, AdmissionError) as exc:
        print(f"shortened {args.command}: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"shortened {args.command}: interrupted", file=sys.stderr)
        return 130
    return 2
