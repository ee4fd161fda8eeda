"""A job's event log: appending an event (numbered in the job's own order, its status
changes notified through the webhook outbox in the same transaction) and reading it back.

Event messages and data are written through ``shortened.redact``: what a tenant reads never
holds a traceback, a server path or a library version (the worker logs the full text with
the job id).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.jsonsafe import json_safe
from service.models import Job, JobEvent, utcnow
from service.webhooks.outbox import enqueue_status_change
from shortened.redact import redact, redact_data


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
        JobEvent(
            job_id=job_id,
            seq=seq,
            time=now,
            type=type,
            message=redact(message),
            data=redact_data(json_safe(data)),
        )
    )
    if type == "status":
        # Webhook outbox: the notifications commit (or roll back) with the state change.
        enqueue_status_change(session, job_id, seq, data, now)
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
