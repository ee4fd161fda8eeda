"""``shortened``: the command line. One verb per workflow.

shortened prune --model DIR --criterion ppl --num-blocks 2 --calibration FILE --output OUT
shortened search --model DIR --calibration FILE --ratio 0.25 [--criteria ppl,taylor] --output OUT
shortened retrain --model DIR --method lora --data FILE --output OUT [--max-steps N]
shortened eval --model DIR [--compare-with PARENT] --ppl FILE --tasks T1,T2 --efficiency [--output OUT]
shortened export --model DIR --target gguf:q4_k_m --target hf-quantized:w4a16 [--calibration FILE] --output OUT
shortened serve|reaper|scheduler|webhooks|keys ...   (the service's processes, service_commands.py)
shortened jobs submit|get|list|cancel|wait|download ...   (a remote service, see jobs.py)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from pydantic import ValidationError

from ..admission import AdmissionError
from . import eval_command, export_command, jobs, prune_command, retrain_command, search_command
from .display import validation_message
from .service_commands import add_service_commands

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    prune_command.add_prune,
    search_command.add_search,
    retrain_command.add_retrain,
    eval_command.add_eval,
    export_command.add_export,
    jobs.add_parser,
    add_service_commands,
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
    args, arguments = parser.parse_known_args(argv)
    if arguments and not getattr(args, "passes_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(arguments)}")
    args.arguments = arguments
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
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as other command-line tools do.
        # stdout is pointed at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 2
