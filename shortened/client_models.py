"""Client-side models of the API's JSON (``service/schemas.py``), for ``shortened.client``.

Defined here rather than imported from ``service`` so that a client needs neither SQLAlchemy
nor FastAPI. Unknown fields are kept (``extra="allow"``) and statuses, kinds and event types
are plain strings, so a newer server does not break an older client.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FINISHED_STATUSES: tuple[str, ...] = ("succeeded", "failed", "cancelled")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Progress(_Model):
    fraction: float = 0.0
    done: int = 0
    total: int = 0
    unit: str = ""


class JobError(_Model):
    code: str
    message: str = ""


class ArtifactInfo(_Model):
    """A published file as recorded on the job."""

    name: str
    size: int
    sha256: str


class Artifact(ArtifactInfo):
    """A published file with where to fetch it: a presigned object-store URL (absolute), or
    a path on the API (relative) that streams it."""

    url: str


class Attempt(_Model):
    attempt: int
    worker: str
    started_at: datetime
    ended_at: datetime | None = None
    outcome: str
    error_code: str | None = None


class PipelineStep(_Model):
    id: str
    kind: str
    status: str
    parent_id: str | None = None


class Pipeline(_Model):
    jobs: list[PipelineStep] = Field(default_factory=list)
    pending: list[str] = Field(default_factory=list)
    status: str
    current: str | None = None


class Job(_Model):
    id: str
    kind: str
    tenant: str | None = None
    status: str
    stage: str | None = None
    progress: Progress = Field(default_factory=Progress)
    cancel_requested: bool = False
    attempts: int = 0
    attempt_history: list[Attempt] = Field(default_factory=list)
    heartbeat_at: datetime | None = None
    lease_expires_at: datetime | None = None
    parent_id: str | None = None
    batch_id: str | None = None
    schedule_id: str | None = None
    pipeline: Pipeline | None = None
    spec: dict[str, Any] = Field(default_factory=dict)
    error: JobError | None = None
    result: dict[str, Any] | None = None
    artifacts: list[ArtifactInfo] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


class JobPage(_Model):
    items: list[Job]
    next_cursor: str | None = None


class Event(_Model):
    seq: int
    time: datetime
    type: str
    message: str = ""
    data: dict[str, Any] | None = None


__all__ = [
    "FINISHED_STATUSES",
    "Artifact",
    "ArtifactInfo",
    "Attempt",
    "Event",
    "Job",
    "JobError",
    "JobPage",
    "Pipeline",
    "PipelineStep",
    "Progress",
]


class Batch(_Model):
    """A submitted grid (``POST /jobs/batch``): its jobs and each one's axis values."""

    id: str
    name: str | None = None
    kind: str
    job_count: int
    job_ids: list[str] = Field(default_factory=list)
    points: list[dict[str, Any]] = Field(default_factory=list)


class BatchSummary(_Model):
    """``GET /batches/{id}``: status counts and the comparison table (``columns``, ``rows``)."""

    id: str
    name: str | None = None
    kind: str
    status: str
    counts: dict[str, int] = Field(default_factory=dict)
    job_count: int
    axes: list[str] = Field(default_factory=list)
    columns: list[str] = Field(default_factory=list)
    rows: list[dict[str, Any]] = Field(default_factory=list)
    baseline: dict[str, Any] | None = None
    best_by_ppl: str | None = None

    @property
    def finished(self) -> bool:
        return all(row.get("status") in FINISHED_STATUSES for row in self.rows)
