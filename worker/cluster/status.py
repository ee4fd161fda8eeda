"""What a TrainJob's status says: pending, running, succeeded or failed (a pure reading).

The Trainer sets the conditions ``Complete`` and ``Failed`` (with the reason and message of
what failed) when the training ends, and ``Suspended`` while a queue (Kueue) holds it; until
then its child Jobs' counts say whether any node runs yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Phase = Literal["pending", "running", "succeeded", "failed"]


@dataclass(frozen=True)
class TrainJobState:
    phase: Phase
    reason: str = ""
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in ("succeeded", "failed")

    def describe(self) -> str:
        detail = ": ".join(part for part in (self.reason, self.message) if part)
        return f"{self.phase} ({detail})" if detail else self.phase


def _true(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next(
        (c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None
    )


def train_job_state(obj: dict[str, Any]) -> TrainJobState:
    """The state of a TrainJob object as the API server returned it."""
    status = obj.get("status") or {}
    conditions = [c for c in status.get("conditions") or [] if isinstance(c, dict)]
    # Failed before Complete: a job the operator marked both ways did not produce a model.
    for kind, phase in (("Failed", "failed"), ("Complete", "succeeded")):
        if (found := _true(conditions, kind)) is not None:
            return TrainJobState(phase, found.get("reason", ""), found.get("message", ""))  # type: ignore[arg-type]
    if (held := _true(conditions, "Suspended")) is not None:
        return TrainJobState("pending", held.get("reason", ""), held.get("message", ""))
    jobs = [j for j in status.get("jobsStatus") or [] if isinstance(j, dict)]
    if any(j.get("active", 0) or j.get("ready", 0) for j in jobs):
        return TrainJobState("running")
    return TrainJobState("pending")
