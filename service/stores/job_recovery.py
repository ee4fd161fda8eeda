"""Giving jobs back to the queue when their run or their message was lost: the reaper's
writes (expired leases re-queued, failed or cancelled; queued jobs whose message may be
lost marked for re-sending), a worker's shutdown handing its job back, and embedded mode
expiring the leases a previous process left.

Safe with several reapers: every change is a compare-and-set, so exactly one of them acts on
a given job. The callers send the task messages after these return.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.models import Job, utcnow
from service.stores.events import append_event
from service.stores.job_lifecycle import end_attempt, rowcount


@dataclass(frozen=True)
class ReapedJob:
    job_id: str
    attempt: int
    action: Literal["requeued", "failed", "cancelled"]
    code: str | None = None


def _requeued(now: datetime) -> dict[str, Any]:
    """The columns of a running job given back to the queue, its message re-sent now."""
    return dict(
        status="queued",
        worker=None,
        lease_expires_at=None,
        deadline_at=None,
        dispatched_at=now,
        dispatch_count=Job.dispatch_count + 1,
        updated_at=now,
    )


def reap_expired_leases(
    session: Session, *, max_attempts: int, now: datetime | None = None, limit: int = 100
) -> list[ReapedJob]:
    """Running jobs whose lease has expired (their worker died or lost the database): back
    to 'queued' for another attempt, or failed with ``worker_lost`` (``timeout`` past their
    deadline) on the last one, or cancelled if a cancel was asked for.

    Safe with several reapers: each change is a compare-and-set on (status, attempt, lease),
    so exactly one of them acts on a given expired attempt; on PostgreSQL the candidate rows
    are also locked with SKIP LOCKED so concurrent reapers do not wait on each other.
    The caller sends the task messages of the re-queued jobs after this returns.
    """
    now = now or utcnow()
    candidates = session.execute(
        select(Job.id, Job.attempts, Job.cancel_requested, Job.deadline_at)
        .where(Job.status == "running", Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    reaped: list[ReapedJob] = []
    for job_id, attempt, cancel, deadline in candidates:
        cas = [
            Job.id == job_id,
            Job.status == "running",
            Job.attempts == attempt,
            Job.lease_expires_at < now,
        ]
        if cancel:
            action, code, status = "cancelled", None, "cancelled"
            message = f"cancelled (the worker of attempt {attempt} was lost)"
        elif deadline is not None and deadline <= now:
            action, code, status = "failed", "timeout", "failed"
            message = f"attempt {attempt} ran past its time limit and its worker was lost"
        elif attempt >= max_attempts:
            action, code, status = "failed", "worker_lost", "failed"
            message = f"the worker was lost on attempt {attempt} of {max_attempts}"
        else:
            action, code, status = "requeued", None, "queued"
            message = f"re-queued: the worker of attempt {attempt} was lost"
        if status == "queued":
            values: dict[str, Any] = _requeued(now)
        else:
            values = dict(
                status=status,
                error_code=code,
                error_message=message if code else None,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
        changed = session.execute(
            update(Job).where(*cas).values(**values).execution_options(synchronize_session=False)
        )
        if not rowcount(changed):
            continue
        data: dict[str, Any] = {"status": status, "attempt": attempt, "reason": "worker_lost"}
        if code:
            data["code"] = code
        append_event(session, job_id, "status", message, data)
        end_attempt(session, job_id, attempt, code or "worker_lost", code, now)
        reaped.append(ReapedJob(job_id, attempt, action, code))  # type: ignore[arg-type]
    session.commit()
    return reaped


def redispatch_backoff_s(after_s: float, dispatch_count: int) -> float:
    """Wait before re-sending a job's message: after_s, then doubling, at most 8x."""
    return after_s * 2 ** min(max(dispatch_count - 1, 0), 3)


def due_for_redispatch(
    session: Session, *, after_s: float, now: datetime | None = None, limit: int = 100
) -> list[str]:
    """Queued jobs nobody has claimed for a while, whose message may have been lost (broker
    restarted without persistence, message dropped): marks them re-sent and returns their
    ids; the caller sends the messages. A duplicate message is harmless (CAS claim)."""
    now = now or utcnow()
    candidates = session.execute(
        select(Job.id, Job.dispatch_count, Job.dispatched_at)
        .where(
            Job.status == "queued",
            or_(
                Job.dispatched_at.is_(None),
                Job.dispatched_at < now - timedelta(seconds=after_s),
            ),
        )
        .order_by(Job.created_at)
        .limit(limit)
    ).all()
    due: list[str] = []
    for job_id, count, dispatched_at in candidates:
        if dispatched_at is not None and (now - dispatched_at).total_seconds() < (
            redispatch_backoff_s(after_s, count)
        ):
            continue
        changed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued", Job.dispatch_count == count)
            .values(dispatched_at=now, dispatch_count=count + 1)
            .execution_options(synchronize_session=False)
        )
        if rowcount(changed):
            due.append(job_id)
    session.commit()
    return due


def dispatch_failed(session: Session, job_id: str, warning: str | None = None) -> None:
    """The message could not be sent (broker down): retry at the next reaper round rather
    than after the backoff meant for duplicates of a message that did go out. With
    ``warning``, the job also gets a warning event saying so."""
    marked = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(dispatched_at=None)
        .execution_options(synchronize_session=False)
    )
    if warning is not None and rowcount(marked):
        append_event(session, job_id, "warning", warning, {"reason": "broker_unavailable"})
    session.commit()


def expire_running_leases(session: Session, now: datetime | None = None) -> int:
    """Embedded mode at start-up: no worker can be running a job yet, so every 'running' job
    was lost with the previous process. Expiring their leases hands them to the reaper's
    rules (re-queued, or failed on their last attempt) instead of waiting out the TTL."""
    now = now or utcnow()
    expired = session.execute(
        update(Job)
        .where(Job.status == "running")
        .values(lease_expires_at=now - timedelta(seconds=1))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return rowcount(expired)


def _give_back(
    session: Session, job_id: str, fence: Any, reason: str, code: str | None, message: str
) -> bool:
    """running -> queued for the attempt ``fence`` selects, without sending its message now:
    ``dispatched_at`` NULL puts it first in the reaper's next re-dispatch round. The attempt
    ends with ``reason``; ``message`` (``{attempt}`` filled in) is the status event. False if
    no such attempt holds the job."""
    now = utcnow()
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", fence)
        .values(**{**_requeued(now), "dispatched_at": None})
        .returning(Job.attempts)
        .execution_options(synchronize_session=False)
    ).scalar()
    if attempt is None:
        session.rollback()
        return False
    data = {"status": "queued", "attempt": attempt, "reason": reason}
    append_event(session, job_id, "status", message.format(attempt=attempt), data)
    end_attempt(session, job_id, attempt, reason, code, now)
    session.commit()
    return True


def requeue_for_shutdown(session: Session, job_id: str, worker: str) -> bool:
    """running -> queued because the worker running it (``worker``, as it claimed the job) is
    shutting down: the attempt ends without counting as a failure of the job, and the
    attempt's next progress report tells it to stop. No message is sent now: the stopping
    worker may still be consuming and would take it back. False if that worker no longer
    holds the job."""
    return _give_back(
        session,
        job_id,
        Job.worker == worker,
        "worker_shutdown",
        None,
        "re-queued: the worker of attempt {attempt} shut down",
    )


def requeue_for_retry(session: Session, job_id: str, attempt: int, code: str) -> bool:
    """running -> queued after attempt ``attempt`` failed with a retryable error (a process
    of a multi-process training run died): the attempt ends as failed with ``code``, and the
    next one resumes from the checkpoints it left. False if the job is no longer that
    attempt's."""
    return _give_back(
        session,
        job_id,
        Job.attempts == attempt,
        code,
        code,
        f"re-queued: attempt {{attempt}} failed ({code}); the next resumes from its checkpoints",
    )
