"""``shortened serve|reaper|scheduler|webhooks|keys``: one command line for the service's
processes. The shared package starts them (``python -m service <command>``) without
importing the service package; ``python -m service.<module>`` starts the same command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shortened.cli import main
from shortened.cli.service_commands import SERVICE_COMMANDS

REPO = Path(__file__).resolve().parents[2]


def test_every_service_command_has_one_declaration() -> None:
    from service.commands import COMMANDS, LOOPS, build_parser

    assert list(COMMANDS) == list(SERVICE_COMMANDS)
    loops = {name: build_parser().parse_args([name, "--once", "--interval", "2"]) for name in LOOPS}
    assert all(args.once and args.interval == 2.0 for args in loops.values())
    scheduler = build_parser().parse_args(["scheduler", "--name", "s1", "--heartbeat-file", "f"])
    assert (scheduler.name, scheduler.heartbeat_file) == ("s1", Path("f"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--api-workers", "0"])


def test_shortened_hands_every_argument_to_the_service(monkeypatch) -> None:
    started: list[list[str]] = []

    def execv(_path: str, argv: list[str]) -> None:
        started.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr("os.execv", execv)
    for argv in (
        ["serve", "--port", "8001", "--api-only"],
        ["scheduler", "--heartbeat-file", "/tmp/alive", "--once"],
        ["keys", "create", "--tenant", "acme", "--help"],
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert started.pop() == [sys.executable, "-m", "service", *argv]


def test_an_engine_command_still_refuses_unknown_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--model", "m", "--num-blocks", "1", "--bogus"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["service.reaper", "service.scheduler", "service.webhooks"])
def test_a_loop_module_runs_the_loop_command(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--once" in done.stdout and "--interval" in done.stdout
