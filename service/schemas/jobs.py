"""Response models of the job routes: a job (with its progress, attempts, pipeline and
artifacts), a page of jobs, an event. Their request bodies are the shared specs in
``shortened.specs``."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, WithJsonSchema

from service.models import Job, JobAttempt, JobEvent, JobRow
from shortened.kinds import JOB_KINDS, kind_names

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def _known_kind(value: str) -> str:
    if value not in JOB_KINDS:
        raise ValueError(f"unknown job kind {value!r}; one of: {', '.join(JOB_KINDS)}")
    return value


# A kind of the job-kind table (``shortened.kinds``), checked against the table when a
# request is read (the schema's enum lists the kinds known when the app started).
JobKind = Annotated[
    str,
    AfterValidator(_known_kind),
    WithJsonSchema({"type": "string", "enum": list(kind_names())}),
]
EventType = Literal["stage", "progress", "warning", "metric", "log", "status"]


class ProgressOut(BaseModel):
    fraction: float = Field(description="done / total of the current stage, 0 when unknown")
    done: int
    total: int
    unit: str


class ErrorOut(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. model_not_found")
    message: str


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str


class ArtifactLink(ArtifactOut):
    url: str = Field(description="Presigned object-store URL, or an API path that streams the file")


class AttemptOut(BaseModel):
    attempt: int
    worker: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str = Field(
        description="running, succeeded, failed, cancelled, timeout, or worker_lost (re-queued)"
    )
    error_code: str | None

    @classmethod
    def from_row(cls, row: JobAttempt | SimpleNamespace) -> AttemptOut:
        return cls(
            attempt=row.attempt,
            worker=row.worker,
            started_at=row.started_at,
            ended_at=row.ended_at,
            outcome=row.outcome,
            error_code=row.error_code,
        )


class PipelineStepOut(BaseModel):
    id: str
    kind: str
    status: JobStatus
    parent_id: str | None


class PipelineOut(BaseModel):
    jobs: list[PipelineStepOut] = Field(
        description="The linked jobs, first (the prune or search job) first"
    )
    pending: list[str] = Field(description="Kinds of the steps not created yet")
    status: JobStatus = Field(
        description="succeeded when every step has; failed/cancelled when one has; else "
        "running (or queued, before the first step starts)"
    )
    current: str | None = Field(description="Id of the step now queued or running, if any")


class JobOut(BaseModel):
    id: str
    kind: str
    tenant: str
    status: JobStatus
    stage: str | None
    progress: ProgressOut
    cancel_requested: bool
    attempts: int
    attempt_history: list[AttemptOut] = Field(
        description="Every attempt: which worker, when, how it ended (never overlapping)"
    )
    heartbeat_at: datetime | None
    lease_expires_at: datetime | None
    parent_id: str | None
    batch_id: str | None = Field(
        default=None, description="The grid it was submitted in (POST /jobs/batch)"
    )
    schedule_id: str | None = Field(default=None, description="The schedule that created it")
    pipeline: PipelineOut | None = Field(
        default=None, description="A pipeline's linked jobs (GET /jobs/{id} only)"
    )
    spec: dict[str, Any]
    error: ErrorOut | None
    result: dict[str, Any] | None
    artifacts: list[ArtifactOut] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def from_row(cls, job: Job | JobRow) -> JobOut:
        total = job.progress_total or 0
        done = job.progress_done or 0
        error = (
            ErrorOut(code=job.error_code, message=job.error_message or "")
            if job.error_code
            else None
        )
        return cls(
            id=job.id,
            kind=job.kind,
            tenant=job.tenant,
            status=job.status,  # type: ignore[arg-type]
            stage=job.stage,
            progress=ProgressOut(
                fraction=min(done / total, 1.0) if total else 0.0,
                done=done,
                total=total,
                unit=job.progress_unit or "",
            ),
            cancel_requested=job.cancel_requested,
            attempts=job.attempts,
            attempt_history=[AttemptOut.from_row(a) for a in job.attempt_rows],
            heartbeat_at=job.heartbeat_at,
            lease_expires_at=job.lease_expires_at,
            parent_id=job.parent_id,
            batch_id=job.batch_id,
            schedule_id=job.schedule_id,
            spec=job.spec,
            error=error,
            result=job.result,
            artifacts=[ArtifactOut(**a) for a in job.artifacts]
            if job.artifacts is not None
            else None,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
        )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as ?after= to get the next (older) page")


class EventOut(BaseModel):
    seq: int
    time: datetime
    type: EventType
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, event: JobEvent) -> EventOut:
        return cls(
            seq=event.seq,
            time=event.time,
            type=event.type,  # type: ignore[arg-type]
            message=event.message,
            data=event.data,
        )
