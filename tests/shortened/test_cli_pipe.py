"""A command whose reader goes away (``shortened ... | head``) stops quietly with status 141,
as other command-line tools do, instead of printing a traceback."""

from __future__ import annotations

import os
import sys

from shortened.cli import main
from tests.helpers import CALIBRATION, TINY_MODEL


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: every write is EPIPE
    saved = os.dup(1)
    stdout = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        args = ["prune", "--model", str(TINY_MODEL), "--num-blocks", "2"]
        code = main([*args, "--calibration", str(CALIBRATION), "--dry-run"])
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert code == 141
    assert "Traceback" not in capsys.readouterr().err
