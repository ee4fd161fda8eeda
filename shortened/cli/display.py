"""What the command-line verbs share: terminal progress, plain tables, one-line validation errors."""

from __future__ import annotations

import os
import sys
from typing import Any

from pydantic import ValidationError


def validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "spec"
        parts.append(f"{where}: {item['msg']}")
    return "invalid arguments: " + "; ".join(parts)


def progress_interval_s() -> float:
    """Seconds between progress lines when output is not a terminal
    (``SHORTENED_PROGRESS_INTERVAL_S``, default 10)."""
    try:
        return max(0.0, float(os.environ.get("SHORTENED_PROGRESS_INTERVAL_S", "10")))
    except ValueError:
        return 10.0


class TerminalProgress:
    """Progress on stderr: on a terminal, a line per stage and a tqdm bar per unit of work
    (blocks, steps); otherwise (a log file, a pipe, CI) plain lines, one per stage and then at
    most one every ``SHORTENED_PROGRESS_INTERVAL_S`` seconds with step/total, loss and ETA."""

    def __init__(self, stream=sys.stderr) -> None:
        from shortened.engine.progress import ProgressLines

        self.stream = stream
        self.interactive = stream.isatty()
        self.lines = None if self.interactive else ProgressLines(progress_interval_s())
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, update: Any) -> None:
        from tqdm import tqdm

        if self.lines is not None:
            line = self.lines(update)
            if line:
                print(line, file=self.stream, flush=True)
            return
        if update.stage != self.stage:
            self.close()
            self.stage = update.stage
            message = f" {update.message}" if update.message else ""
            print(f"[{update.stage}]{message}", file=self.stream, flush=True)
        if update.total:
            if self.bar is None or self.bar.total != update.total:
                self.close()
                self.bar = tqdm(
                    total=update.total,
                    unit=f" {update.unit}" if update.unit else "it",
                    file=self.stream,
                    disable=not self.interactive,
                    leave=True,
                    desc=update.stage,
                )
            self.bar.n = update.done
            if update.metrics:
                self.bar.set_postfix(
                    {
                        k: (f"{v:.4g}" if isinstance(v, float) else v)
                        for k, v in update.metrics.items()
                    },
                    refresh=False,
                )
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def aligned(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain text table, numbers right-aligned."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])
