"""Reads and writes of the job store, shared by the API and the worker.

State transitions are compare-and-set UPDATEs (``... WHERE status = 'queued'``), so the
API cancelling a job and a worker starting it cannot both win, and a redelivered task
message finds the job no longer queued.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Result, and_, or_, select, update
from sqlalchemy.orm import Session

from service.models import FINISHED_STATUSES, Job, JobEvent, utcnow


class InvalidCursor(ValueError):
    pass


class JobFinished(Exception):
    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} is already {job.status}")
        self.job = job


def json_safe(value: Any) -> Any:
    """A JSON-compatible copy: non-finite floats (an infinite perplexity) become None,
    since neither strict JSON responses nor PostgreSQL's jsonb accept them; other
    non-JSON values (paths, ...) become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _rowcount(result: Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


def new_job_id() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------- events


def append_event(
    session: Session,
    job_id: str,
    type: str,
    message: str = "",
    data: dict[str, Any] | None = None,
) -> int:
    """Add an event to the session (the caller commits) and return its number.

    The number comes from incrementing ``jobs.event_seq``: the UPDATE locks the job row
    until commit, so concurrent writers get distinct numbers that commit in order.
    """
    now = utcnow()
    seq = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(event_seq=Job.event_seq + 1, updated_at=now)
        .returning(Job.event_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    session.add(
        JobEvent(job_id=job_id, seq=seq, time=now, type=type, message=message, data=json_safe(data))
    )
    return seq


def list_events(
    session: Session, job_id: str, after_seq: int = 0, limit: int = 1000
) -> list[JobEvent]:
    return list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
            .order_by(JobEvent.seq)
            .limit(limit)
        )
    )


# ---------------------------------------------------------------------------- API side


def create_job(
    session: Session, kind: str, spec: dict[str, Any], parent_id: str | None = None
) -> Job:
    now = utcnow()
    job = Job(
        id=new_job_id(),
        kind=kind,
        status="queued",
        spec=spec,
        parent_id=parent_id,
        progress_done=0,
        progress_total=0,
        progress_unit="",
        cancel_requested=False,
        attempts=0,
        event_seq=0,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    append_event(session, job.id, "status", "queued", {"status": "queued"})
    session.commit()
    return reload(session, job.id)


def reload(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


def encode_cursor(job: Job) -> str:
    raw = json.dumps({"t": job.created_at.isoformat(), "id": job.id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        created_at = datetime.fromisoformat(data["t"])
        job_id = str(data["id"])
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidCursor("invalid cursor") from exc
    if created_at.tzinfo is None:
        raise InvalidCursor("invalid cursor")
    return created_at, job_id


def list_jobs(
    session: Session,
    *,
    kind: str | None = None,
    status: str | None = None,
    limit: int = 50,
    after: str | None = None,
) -> tuple[list[Job], str | None]:
    """Newest first, ordered by (created_at, id) so that pages never overlap or skip."""
    query = select(Job)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if status is not None:
        query = query.where(Job.status == status)
    if after:
        created_at, job_id = decode_cursor(after)
        query = query.where(
            or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.id < job_id))
        )
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    jobs = list(session.scalars(query))
    next_cursor = encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return jobs[:limit], next_cursor


@dataclass(frozen=True)
class CancelOutcome:
    job: Job
    immediate: bool  # True: it was queued and is now cancelled; False: the worker will stop it


def request_cancel(session: Session, job_id: str) -> CancelOutcome | None:
    """Cancel a queued job at once, or flag a running one for its worker.

    Returns None for an unknown id and raises ``JobFinished`` for a finished job.
    """
    now = utcnow()
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if _rowcount(cancelled):
        append_event(
            session, job_id, "status", "cancelled before it started", {"status": "cancelled"}
        )
        session.commit()
        return CancelOutcome(reload(session, job_id), immediate=True)
    flagged = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.cancel_requested.is_(False))
        .values(cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if _rowcount(flagged):
        append_event(session, job_id, "status", "cancel requested", {"cancel_requested": True})
    session.commit()
    job = get_job(session, job_id)
    if job is None:
        return None
    if job.status in FINISHED_STATUSES:
        raise JobFinished(job)
    return CancelOutcome(job, immediate=False)


def fail_queued_job(session: Session, job_id: str, code: str, message: str) -> None:
    """Used when the task message could not be sent: the job would wait forever."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="failed", error_code=code, error_message=message, finished_at=now, updated_at=now
        )
        .execution_options(synchronize_session=False)
    )
    if _rowcount(result):
        append_event(session, job_id, "status", message, {"status": "failed", "code": code})
    session.commit()


# ---------------------------------------------------------------------------- worker side


def claim_job(session: Session, job_id: str, worker: str) -> Job | None:
    """queued -> running; None when the job is unknown or not queued (cancelled, already
    running or finished: a redelivered message must not run it twice)."""
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            started_at=now,
            heartbeat_at=now,
            updated_at=now,
            attempts=Job.attempts + 1,
            worker=worker,
        )
        .execution_options(synchronize_session=False)
    )
    if not _rowcount(claimed):
        session.rollback()
        return None
    append_event(session, job_id, "status", "running", {"status": "running", "worker": worker})
    session.commit()
    return reload(session, job_id)


def record_progress(
    session: Session,
    job_id: str,
    *,
    stage: str,
    done: int,
    total: int,
    unit: str,
    events: Sequence[tuple[str, str, dict[str, Any] | None]] = (),
) -> bool:
    """Write the progress columns and heartbeat, append ``events`` (type, message, data),
    and return whether the job should stop (cancel requested or no longer running)."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(
            stage=stage,
            progress_done=done,
            progress_total=total,
            progress_unit=unit,
            heartbeat_at=now,
            updated_at=now,
        )
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).first()
    if row is not None:
        for type_, message, data in events:
            append_event(session, job_id, type_, message, data)
    session.commit()
    return row is None or bool(row.cancel_requested)


def cancel_requested(session: Session, job_id: str) -> bool:
    value = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return bool(value)


def finish_job(
    session: Session,
    job_id: str,
    status: str,
    *,
    message: str,
    error_code: str | None = None,
    error_message: str | None = None,
    result: dict[str, Any] | None = None,
    artifacts: list[dict[str, Any]] | None = None,
) -> bool:
    """running -> succeeded | failed | cancelled, with its status event."""
    assert status in FINISHED_STATUSES
    now = utcnow()
    finished = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(
            status=status,
            error_code=error_code,
            error_message=error_message,
            result=json_safe(result),
            artifacts=artifacts,
            finished_at=now,
            updated_at=now,
            heartbeat_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if _rowcount(finished):
        data: dict[str, Any] = {"status": status}
        if error_code:
            data["code"] = error_code
        append_event(session, job_id, "status", message, data)
    session.commit()
    return bool(_rowcount(finished))


def fail_orphaned_running_jobs(session: Session, message: str) -> int:
    """Embedded mode only: at start-up no worker can be running a job yet, so a job still
    'running' was lost with the previous process (the filesystem broker cannot redeliver)."""
    job_ids = list(session.scalars(select(Job.id).where(Job.status == "running")))
    for job_id in job_ids:
        finish_job(
            session,
            job_id,
            "failed",
            message=message,
            error_code="worker_lost",
            error_message=message,
        )
    return len(job_ids)
