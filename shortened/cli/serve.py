"""``shortened serve``: the API and a worker with embedded defaults, in a process of their own
(the service package is started, not imported, so the shared package depends on nothing above it)."""

from __future__ import annotations

import argparse
import os
import sys


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the API and a worker with embedded defaults (SQLite, local artifacts)"
    )
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument(
        "--api-workers",
        type=int,
        default=None,
        help="API processes (default: SHORTENED_API_WORKERS, else one per CPU core)",
    )
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "service.serve"]
    if args.host is not None:
        command += ["--host", args.host]
    if args.port is not None:
        command += ["--port", str(args.port)]
    if args.api_workers is not None:
        command += ["--api-workers", str(args.api_workers)]
    # Replace this process: signals (Ctrl-C, SIGTERM) reach the server directly and its exit
    # status is the command's.
    os.execv(sys.executable, command)
    return 0  # not reached
