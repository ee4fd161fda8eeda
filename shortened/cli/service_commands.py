"""``shortened serve|reaper|scheduler|webhooks|keys``: the service's processes. Each starts
``python -m service <command>`` in place of this process, so the shared package depends on
nothing above it (the service package is started, never imported); ``python -m
service.<module>`` starts its command the same way. Their options are
declared once, by the service's own command line (``service/commands.py``), which receives
everything after the command name: ``shortened reaper --help`` shows them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

# The service's commands and what each does (the service's command line reads these too).
SERVICE_COMMANDS: dict[str, str] = {
    "serve": "run the API and a worker with embedded defaults (SQLite, local artifacts)",
    "reaper": "re-queue the jobs of lost workers and re-send lost messages",
    "scheduler": "create the jobs of due cron slots of schedules (one per slot, with any "
    "number of schedulers)",
    "webhooks": "send due webhook deliveries (signed, retried with backoff)",
    "keys": "create, list and revoke API keys",
}


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    for name, summary in SERVICE_COMMANDS.items():
        # No options here (not even --help): every argument goes to the service's parser.
        p = sub.add_parser(name, help=summary, add_help=False)
        p.set_defaults(handler=_start, passes_arguments=True)


def _start(args: argparse.Namespace) -> int:
    start_service_command(args.command, args.arguments)


def start_service_command(command: str, arguments: Sequence[str] | None = None) -> NoReturn:
    """Replace this process with ``python -m service <command> <arguments>`` (default: this
    process's own arguments, for ``python -m service.<module>``). Signals (Ctrl-C, SIGTERM)
    then reach the service directly and its exit status is the command's."""
    rest = sys.argv[1:] if arguments is None else arguments
    os.execv(sys.executable, [sys.executable, "-m", "service", command, *rest])
