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
