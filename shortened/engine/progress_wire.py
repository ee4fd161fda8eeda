"""Progress as marked JSON lines in a process's output, for a reader in another process.

A training process the worker did not start itself (a pod of a cluster's training operator)
cannot call the worker's progress callback; its rank 0 prints each update as one line,
``@shortened-progress {"stage": ..., "done": ..., ...}``, among its other output, and the
worker, reading that output (the pod's log), turns the marked lines back into
:class:`Progress` and passes every other line on as plain log text.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from .progress import Progress

MARKER = "@shortened-progress "


def progress_line(update: Progress) -> str:
    """The one line (no newline) that stands for ``update``."""
    body: dict[str, Any] = {"stage": update.stage}
    for name in ("done", "total", "unit", "message"):
        if value := getattr(update, name):
            body[name] = value
    if update.metrics:
        body["metrics"] = update.metrics
    return MARKER + json.dumps(body, separators=(",", ":"), default=str)


def parse_progress_line(line: str) -> Progress | None:
    """The update a marked line stands for; None for any other line (or a marked line whose
    body is not an update: the output is the trainer's, and a bad line must not stop it)."""
    start = line.find(MARKER)
    if start < 0:
        return None
    try:
        body = json.loads(line[start + len(MARKER) :])
        if not isinstance(body, dict) or not isinstance(body.get("stage"), str):
            return None
        metrics = body.get("metrics") or {}
        return Progress(
            stage=body["stage"],
            done=int(body.get("done", 0)),
            total=int(body.get("total", 0)),
            unit=str(body.get("unit", "")),
            message=str(body.get("message", "")),
            metrics=dict(metrics) if isinstance(metrics, dict) else {},
        )
    except (ValueError, TypeError):
        return None


class ProgressPrinter:
    """A progress callback that prints each update as a marked line (rank 0 of a cluster
    run); flushed at once, so the reader sees it while the step that follows runs."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def __call__(self, update: Progress) -> None:
        stream = self.stream or sys.stdout
        stream.write(progress_line(update) + "\n")
        stream.flush()
