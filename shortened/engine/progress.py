"""How the engine reports progress without knowing about jobs.

Callers pass a callable; the engine calls it at every stage change and after every unit of
work (a block scored, a training step). The callable may raise ``Cancelled`` to stop the
engine at that point: the engine then cleans up and publishes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    stage: str  # loading | calibration | scoring | pruning | saving | training | evaluating
    done: int = 0
    total: int = 0
    unit: str = ""  # "blocks", "steps", "windows"
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


ProgressCallback = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    """Default callback: report nothing."""


def singular(unit: str) -> str:
    """The singular of a plural unit (``blocks`` -> ``block``, ``batches`` -> ``batch``)."""
    for plural, one in (("ches", "ch"), ("shes", "sh"), ("sses", "ss"), ("xes", "x")):
        if unit.endswith(plural):
            return unit[: -len(plural)] + one
    return unit[:-1] if unit.endswith("s") and not unit.endswith("ss") else unit


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _metric(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressLines:
    """Progress as plain text lines, for logs and for output that is not a terminal.

    A line at every stage change, then at most one every ``interval_s`` while the stage's
    work advances (``step 40/200 (20%) loss 2.31 | 1:05 elapsed, ETA 4:20``), and one when
    its last unit is done. Call it with each update; it returns the line to write, or None.
    """

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] | None = None) -> None:
        import time

        self.interval_s = interval_s
        self.clock = clock or time.monotonic
        self.stage: str | None = None
        self.started = 0.0  # when the stage's first unit of work was reported
        self.first_done = 0
        self.last_line = 0.0
        self.last_done = -1

    def __call__(self, update: Progress) -> str | None:
        now = self.clock()
        if update.stage != self.stage:
            self.stage, self.started, self.first_done = update.stage, now, update.done
            self.last_line, self.last_done = now, update.done
            message = f" {update.message}" if update.message else ""
            return f"[{update.stage}]{message}"
        if not update.total or update.done == self.last_done:
            return None
        finished = update.done >= update.total
        if not finished and now - self.last_line < self.interval_s:
            return None
        self.last_line, self.last_done = now, update.done
        unit = singular(update.unit) if update.unit else "step"
        parts = [
            f"[{update.stage}] {unit} {update.done}/{update.total} "
            f"({100 * update.done / update.total:.0f}%)"
        ]
        parts += [f"{key} {_metric(value)}" for key, value in (update.metrics or {}).items()]
        elapsed = now - self.started
        timing = f"{_clock(elapsed)} elapsed"
        advanced = update.done - self.first_done
        if not finished and advanced > 0 and elapsed > 0:
            timing += f", ETA {_clock((update.total - update.done) * elapsed / advanced)}"
        return " ".join(parts) + " | " + timing
