"""A job's life from the queue to its end: the worker's claim (a new attempt with a lease),
lease renewal, progress and finish, and the API's cancel request.

State transitions are compare-and-set UPDATEs (``... WHERE status = 'queued'``), so the
API cancelling a job and a worker starting it cannot both win, and a redelivered task
message finds the job no longer queued.

Each claim starts a numbered attempt (``jobs.attempts`` and a ``job_attempts`` row) with a
lease. Every write of the worker is fenced by its attempt number: once the reaper has
re-queued a job whose lease expired (``job_recovery``), the old attempt can neither report
progress nor finish it, so one job never has two live runs. Job error messages are written
through ``shortened.redact``, as events are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Result, case, select, update
from sqlalchemy.orm import Session

from service.jsonsafe import json_safe
from service.models import FINISHED_STATUSES, Job, JobAttempt, utcnow
from service.stores.events import append_event
from service.stores.job_reads import get_job
from shortened.redact import redact


class JobFinished(Exception):
    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} is already {job.status}")
        self.job = job


def rowcount(result: Result[Any]) -> int:
    """How many rows an UPDATE changed (what its compare-and-set decides on)."""
    return cast(CursorResult[Any], result).rowcount


def _reloaded(session: Session, job_id: str) -> Job:
    job = get_job(session, job_id)
    assert job is not None
    return job


@dataclass(frozen=True)
class CancelOutcome:
    job: Job
    immediate: bool  # True: it was queued and is now cancelled; False: the worker will stop it


def request_cancel(
    session: Session, job_id: str, tenant: str | None = None
) -> CancelOutcome | None:
    """Cancel a queued job at once, or flag a running one for its worker.

    Returns None for an unknown id (or another tenant's job) and raises ``JobFinished`` for
    a finished job.
    """
    if get_job(session, job_id, tenant) is None:
        return None
    now = utcnow()
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if rowcount(cancelled):
        append_event(
            session, job_id, "status", "cancelled before it started", {"status": "cancelled"}
        )
        session.commit()
        return CancelOutcome(_reloaded(session, job_id), immediate=True)
    flagged = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.cancel_requested.is_(False))
        .values(cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if rowcount(flagged):
        append_event(session, job_id, "status", "cancel requested", {"cancel_requested": True})
    session.commit()
    job = get_job(session, job_id)
    if job is None:
        return None
    if job.status in FINISHED_STATUSES:
        raise JobFinished(job)
    return CancelOutcome(job, immediate=False)


def claim_job(
    session: Session,
    job_id: str,
    worker: str,
    *,
    lease_ttl_s: float = 60.0,
    time_limit_s: float | None = None,
) -> Job | None:
    """queued -> running as a new attempt with a lease; None when the job is unknown or not
    queued (cancelled, already running or finished: a redelivered message must not run it
    twice). The attempt number is ``job.attempts`` of the returned row."""
    now = utcnow()
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            started_at=now,
            heartbeat_at=now,
            lease_expires_at=now + timedelta(seconds=lease_ttl_s),
            deadline_at=now + timedelta(seconds=time_limit_s) if time_limit_s else None,
            updated_at=now,
            attempts=Job.attempts + 1,
            worker=worker,
        )
        .returning(Job.attempts)
        .execution_options(synchronize_session=False)
    ).scalar()
    if attempt is None:
        session.rollback()
        return None
    session.add(JobAttempt(job_id=job_id, attempt=attempt, worker=worker, started_at=now))
    append_event(
        session,
        job_id,
        "status",
        "running",
        {"status": "running", "worker": worker, "attempt": attempt},
    )
    session.commit()
    return _reloaded(session, job_id)


def _fenced(job_id: str, attempt: int | None) -> list[Any]:
    """WHERE clauses of a worker's write: the job is running, and still as this attempt."""
    clauses = [Job.id == job_id, Job.status == "running"]
    if attempt is not None:
        clauses.append(Job.attempts == attempt)
    return clauses


def renew_lease(session: Session, job_id: str, attempt: int, lease_ttl_s: float) -> bool:
    """The heartbeat: extend the attempt's lease. False when the attempt no longer holds
    the job (re-queued by the reaper, finished, or cancelled while queued)."""
    now = utcnow()
    renewed = session.execute(
        update(Job)
        .where(*_fenced(job_id, attempt))
        .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_ttl_s))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(rowcount(renewed))


def record_progress(
    session: Session,
    job_id: str,
    *,
    stage: str,
    done: int,
    total: int,
    unit: str,
    events: Sequence[tuple[str, str, dict[str, Any] | None]] = (),
    attempt: int | None = None,
) -> bool:
    """Write the progress columns and heartbeat, append ``events`` (type, message, data),
    and return whether the job should stop (cancel requested, no longer running, or no
    longer this ``attempt``'s)."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(*_fenced(job_id, attempt))
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
    attempt: int | None = None,
) -> bool:
    """running -> succeeded | failed | cancelled, with its status event, ending the attempt.
    With ``attempt``, only if the job is still that attempt's (a worker that lost its lease
    cannot finish the job the next attempt is running)."""
    assert status in FINISHED_STATUSES
    now = utcnow()
    current = session.scalar(select(Job.attempts).where(*_fenced(job_id, attempt)))
    if current is None:
        session.rollback()
        return False
    # A succeeded job reads as finished, not as its last stage (publishing, 0 of 0).
    done: dict[str, Any] = {}
    if status == "succeeded":
        total = case((Job.progress_total > 0, Job.progress_total), else_=1)
        done = {"stage": "done", "progress_done": total, "progress_total": total}
    finished = session.execute(
        update(Job)
        .where(*_fenced(job_id, current))
        .values(
            **done,
            status=status,
            error_code=error_code,
            error_message=None if error_message is None else redact(error_message),
            result=json_safe(result),
            artifacts=artifacts,
            finished_at=now,
            updated_at=now,
            heartbeat_at=now,
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if rowcount(finished):
        data: dict[str, Any] = {"status": status}
        if error_code:
            data["code"] = error_code
        append_event(session, job_id, "status", message, data)
        outcome = error_code if error_code in ("timeout", "worker_lost") else status
        end_attempt(session, job_id, current, outcome, error_code, now)
    session.commit()
    return bool(rowcount(finished))


def end_attempt(
    session: Session,
    job_id: str,
    attempt: int,
    outcome: str,
    error_code: str | None,
    now: datetime,
) -> None:
    """Close the attempt's row with how it ended (the caller commits with the job's change)."""
    session.execute(
        update(JobAttempt)
        .where(
            JobAttempt.job_id == job_id,
            JobAttempt.attempt == attempt,
            JobAttempt.ended_at.is_(None),
        )
        .values(ended_at=now, outcome=outcome, error_code=error_code)
        .execution_options(synchronize_session=False)
    )
