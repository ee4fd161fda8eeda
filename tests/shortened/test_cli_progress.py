"""Progress when the CLI's output is not a terminal (a log file, CI): plain lines with the
stage, step/total and ETA, instead of silence until the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helpers import CALIBRATION, TINY_MODEL


def _run(args: list[str], interval_s: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHORTENED_PROGRESS_INTERVAL_S": interval_s, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "shortened.cli", *args],
        capture_output=True,  # pipes, not a terminal
        text=True,
        env=env,
        timeout=600,
    )


def test_prune_prints_progress_lines_to_a_pipe(tmp_path) -> None:
    args = [
        "prune",
        "--model",
        str(TINY_MODEL),
        "--criterion",
        "ppl",
        "--num-blocks",
        "2",
        "--calibration",
        str(CALIBRATION),
        "--n-samples",
        "4",
        "--seq-len",
        "64",
        "--output",
        str(tmp_path / "out"),
    ]
    result = _run(args, "0")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    scoring = [line for line in lines if re.match(r"\[scoring\] block \d+/\d+ \(\d+%\)", line)]
    # Every scored block with interval 0; timing on each line, an ETA until the last.
    assert len(scoring) >= 4, result.stderr
    assert all(" elapsed" in line for line in scoring)
    assert "ETA" in scoring[0] and "ETA" not in scoring[-1]
    assert "\r" not in result.stderr  # no progress bars redrawn into a log
    # Throttled: with a long interval only stage lines and each stage's last unit remain.
    quiet = _run([*args[:-1], str(tmp_path / "out2")], "3600")
    assert quiet.returncode == 0, quiet.stderr
    quiet_scoring = [
        line for line in quiet.stderr.splitlines() if line.startswith("[scoring] block")
    ]
    assert len(quiet_scoring) == 1 and "100%" in quiet_scoring[0]


def test_progress_lines_name_one_unit_of_plural_units() -> None:
    from shortened.engine.progress import Progress, ProgressLines

    lines = ProgressLines(interval_s=0, clock=lambda: 0.0)
    lines(Progress("zero_shot", 0, 3, "batches"))
    assert (lines(Progress("zero_shot", 3, 3, "batches")) or "").startswith(
        "[zero_shot] batch 3/3 (100%)"
    )
    lines(Progress("scoring", 0, 2, "blocks"))
    assert (lines(Progress("scoring", 1, 2, "blocks")) or "").startswith("[scoring] block 1/2")
