"""The service's processes behind one command line: ``python -m service
serve|reaper|scheduler|webhooks|keys``, which ``shortened <command>`` and ``python -m
service.<module>`` start. Every option of these processes is declared
here, once, and the three background loops (reaper, scheduler, webhook dispatcher) share one
runner: one round (``--once``) or rounds every ``--interval`` seconds until SIGTERM or
Ctrl-C, on the settings' database.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shortened.cli.service_commands import SERVICE_COMMANDS
from shortened.config import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from service.loop import BackgroundLoop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopCommand:
    """A background loop as a process of its own: how to build it, its round interval from
    the settings (when ``--interval`` is not given), and options of its own."""

    build: Callable[[Settings, sessionmaker[Session], argparse.Namespace], BackgroundLoop]
    interval_s: Callable[[Settings], float]
    add_options: Callable[[argparse.ArgumentParser], None] | None = None


def _reaper(
    settings: Settings, sessions: sessionmaker[Session], _: argparse.Namespace
) -> BackgroundLoop:
    from service.queue import make_celery
    from service.reaper import Reaper

    return Reaper(settings, sessions, make_celery(settings))


def _scheduler(
    settings: Settings, sessions: sessionmaker[Session], args: argparse.Namespace
) -> BackgroundLoop:
    from service.queue import make_celery
    from service.scheduler import Scheduler

    scheduler = Scheduler(settings, sessions, make_celery(settings), args.name)
    scheduler.heartbeat_file = args.heartbeat_file
    return scheduler


def _scheduler_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="this scheduler's name in schedule runs (default: host:pid)")
    parser.add_argument(
        "--heartbeat-file",
        type=Path,
        help="touch this file after every successful round (for a liveness probe)",
    )


def _webhooks(
    settings: Settings, sessions: sessionmaker[Session], _: argparse.Namespace
) -> BackgroundLoop:
    from service.webhooks.dispatcher import WebhookDispatcher

    return WebhookDispatcher(settings, sessions)


LOOPS: dict[str, LoopCommand] = {
    "reaper": LoopCommand(_reaper, lambda s: s.reaper_interval_s or 15.0),
    "scheduler": LoopCommand(
        _scheduler, lambda s: s.scheduler_interval_s or 5.0, _scheduler_options
    ),
    "webhooks": LoopCommand(_webhooks, lambda s: s.webhook_interval_s or 1.0),
}


def run_loop(command: LoopCommand, args: argparse.Namespace) -> int:
    """Build the loop on the settings' database and run it: one round, or rounds until
    SIGTERM (the current round finishes) or Ctrl-C."""
    from service.db import make_engine, make_sessionmaker
    from service.loop import BackgroundLoop

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    loop = command.build(settings, make_sessionmaker(engine), args)
    label = " ".join(filter(None, (loop.loop_name, getattr(loop, "name", None))))
    # Only ask the loop to end: a loop's own stop may also release what its current round
    # is using (the dispatcher's senders), which happens below once the round is over.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: BackgroundLoop.stop(loop))
    try:
        if args.once:
            log.info("%s: %s", label, loop.run_once())
        else:
            interval = args.interval or command.interval_s(settings)
            log.info("%s started (every %.3g s)", label, interval)
            loop.run_forever(interval)
            log.info("%s stopped", label)
    except KeyboardInterrupt:
        pass
    finally:
        loop.stop()
        engine.dispose()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from service.serve import serve

    overrides = {
        key: value
        for key, value in {
            "api_host": args.host,
            "api_port": args.port,
            "api_workers": args.api_workers,
        }.items()
        if value is not None
    }
    serve(Settings(**overrides), api_only=args.api_only)
    return 0


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(
        "--api-workers",
        type=_at_least_one,
        default=None,
        help="API processes (default: SHORTENED_API_WORKERS, else one per CPU core)",
    )
    parser.add_argument(
        "--api-only",
        action="store_true",
        help="serve the API only: no migrations, no worker (they run elsewhere)",
    )


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _keys(args: argparse.Namespace) -> int:
    from service.keys import manage_keys

    return manage_keys(args)


def _keys_options(parser: argparse.ArgumentParser) -> None:
    from service.models import ROLES

    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", choices=ROLES, default="member")
    create.add_argument("--name", help="a label, e.g. who or what uses the key")
    listing = actions.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--tenant")
    revoke = actions.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")


def _loop_options(loop: LoopCommand) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--once", action="store_true", help="one round, then exit")
        parser.add_argument(
            "--interval", type=float, help="seconds between rounds (default: settings)"
        )
        if loop.add_options is not None:
            loop.add_options(parser)

    return add


# Each command: how its options are declared, and what runs it.
COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {
    "serve": (_serve_options, _serve),
    **{
        name: (_loop_options(loop), functools.partial(run_loop, loop))
        for name, loop in LOOPS.items()
    },
    "keys": (_keys_options, _keys),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shortened", description="The service's processes.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, summary in SERVICE_COMMANDS.items():
        add_options, handler = COMMANDS[name]
        command = commands.add_parser(name, help=summary, description=summary)
        add_options(command)
        command.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))
