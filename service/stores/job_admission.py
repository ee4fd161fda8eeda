"""Admission's writes to the job store: a new job with its first event, found again by its
Idempotency-Key, and committed only within the tenant's limit of queued and running jobs
(counted under the tenant lock).

Every admission runs these, so the rows go in through :class:`service.statements.Statement`
(no ORM flush) and the limit check reaches PostgreSQL in the same flight as the COMMIT.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import (
    Integer,
    String,
    bindparam,
    func,
    insert,
    or_,
    select,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, configure_mappers, make_transient_to_detached
from sqlalchemy.orm.attributes import instance_dict, set_committed_value

from service.locks import tenant_lock, tenant_lock_key
from service.models import Job, JobEvent, utcnow
from service.statements import Statement, run_together
from service.webhooks.outbox import ENDPOINTS, enqueue_status_change


class DuplicateIdempotencyKey(Exception):
    """Another job of the tenant was created with the same Idempotency-Key."""


def new_job_id() -> str:
    return uuid.uuid4().hex


_JOB_KEYS = tuple(c.key for c in Job.__table__.c)
# The columns create_job writes; the others are NULL (SQL NULL, not JSON null) until the
# worker sets them.
_NEW_JOB_COLUMNS = (
    "id", "kind", "status", "spec", "parent_id", "progress_done", "progress_total",
    "progress_unit", "cancel_requested", "attempts", "event_seq", "tenant", "idempotency_key",
    "request_hash", "schedule_id", "batch_id", "dispatched_at", "dispatch_count", "created_at",
    "updated_at",
)  # fmt: skip
_INSERT_JOB = Statement(insert(Job).values({name: bindparam(name) for name in _NEW_JOB_COLUMNS}))
_INSERT_FIRST_EVENT = Statement(
    insert(JobEvent).values(
        {name: bindparam(name) for name in ("job_id", "seq", "time", "type", "message", "data")}
    )
)


def create_job(
    session: Session,
    kind: str,
    spec: dict[str, Any],
    parent_id: str | None = None,
    *,
    tenant: str = "default",
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    schedule_id: str | None = None,
    batch_id: str | None = None,
    commit: bool = True,
) -> Job:
    """Insert a queued job with its first event (the caller sends its message next).
    Raises ``DuplicateIdempotencyKey`` when the tenant already used ``idempotency_key``.
    With ``commit=False`` the rows are only inserted, in the caller's transaction.

    Every admission runs this, so the rows go in through :class:`Statement` (two INSERTs,
    no ORM flush); the returned job is attached to the session as the persistent object of
    its row, every attribute loaded."""
    now = utcnow()
    values: dict[str, Any] = {
        "id": new_job_id(),
        "kind": kind,
        "status": "queued",
        "spec": spec,
        "parent_id": parent_id,
        "progress_done": 0,
        "progress_total": 0,
        "progress_unit": "",
        "cancel_requested": False,
        "attempts": 0,
        "event_seq": 1,  # its "queued" event, inserted below
        "tenant": tenant,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "schedule_id": schedule_id,
        "batch_id": batch_id,
        "dispatched_at": now,
        "dispatch_count": 1,
        "created_at": now,
        "updated_at": now,
    }
    # The job's first event is numbered 1 directly: the row is new, nobody else can be
    # numbering its events yet (append_event's UPDATE is for existing jobs). The two rows
    # and the tenant's webhook endpoints (for the event's deliveries) in one flight.
    data = {"status": "queued"}
    event = {"job_id": values["id"], "seq": 1, "time": now, "type": "status",
             "message": "queued", "data": data}  # fmt: skip
    try:
        _, _, endpoints = run_together(
            session,
            [(_INSERT_JOB, values), (_INSERT_FIRST_EVENT, event), (ENDPOINTS, {"tenant": tenant})],
        )
    except IntegrityError as exc:
        session.rollback()
        if idempotency_key is not None:
            raise DuplicateIdempotencyKey(idempotency_key) from exc
        raise
    # The row's persistent object, built as a query result is (the column values set as
    # loaded, no attribute events: the constructor's cost more than both INSERTs' CPU).
    configure_mappers()  # what the constructor would do first (at once when done already)
    job = Job.__mapper__.class_manager.new_instance()
    instance_dict(job).update({key: values.get(key) for key in _JOB_KEYS})
    make_transient_to_detached(job)
    session.add(job)  # persistent: no INSERT, and a later change is an UPDATE
    set_committed_value(job, "attempt_rows", [])  # a new job has none: no query for them
    enqueue_status_change(session, job.id, 1, data, now, job=job, endpoints=endpoints)
    if not commit:
        return job
    session.commit()  # expire_on_commit=False: the object is the row as inserted
    return job


def find_by_idempotency_key(session: Session, tenant: str, key: str) -> Job | None:
    return session.scalars(
        select(Job)
        .where(Job.tenant == tenant, Job.idempotency_key == key)
        .execution_options(populate_existing=True)
    ).first()


_ACTIVE_JOBS = select(Job.status).where(  # in ix_jobs_tenant_status: no row read for it
    Job.tenant == bindparam("tenant"), or_(Job.status == "queued", Job.status == "running")
)
_COUNT_ACTIVE = Statement(select(func.count()).select_from(_ACTIVE_JOBS.subquery()))
_COUNT_ACTIVE_UP_TO = Statement(
    select(func.count()).select_from(_ACTIVE_JOBS.limit(bindparam("up_to")).subquery())
)


def count_active_jobs(session: Session, tenant: str, up_to: int | None = None) -> int:
    """Queued and running jobs of a tenant (its concurrency limit counts these); with
    ``up_to``, counted no further than that (what a limit check needs: the work is bounded by
    the limit, not by how many jobs the tenant has)."""
    if up_to is None:
        rows = _COUNT_ACTIVE.run(session, {"tenant": tenant})
    else:
        rows = _COUNT_ACTIVE_UP_TO.run(session, {"tenant": tenant, "up_to": up_to})
    return int(rows[0][0] or 0)


def over_limit_locked(session: Session, tenant: str, limit: int, adding: int = 0) -> bool:
    """Take the tenant lock (held until the transaction ends), then whether the tenant's
    queued and running jobs, plus ``adding`` not yet inserted, exceed ``limit``."""
    tenant_lock(session, tenant)
    return count_active_jobs(session, tenant, up_to=limit + 1) + adding > limit


class OverLimit(Exception):
    """Committing would take the tenant past its limit of queued and running jobs."""


OVER_LIMIT_SQLSTATE = "SH429"  # raised by jobs_active_within_limit (migration 0006)
_WITHIN_LIMIT = Statement(
    select(
        func.jobs_active_within_limit(
            bindparam("lock_key", type_=String),
            bindparam("tenant", type_=String),
            bindparam("limit", type_=Integer),
        )
    )
)


def commit_within_limit(session: Session, tenant: str, limit: int) -> None:
    """Commit the session's transaction if the tenant's queued and running jobs, the ones it
    inserted included, are at most ``limit``; else raise :class:`OverLimit` and leave the
    transaction for the caller to roll back. Exact under concurrency: the count is made
    under the tenant lock (``locks.tenant_lock``), held until the commit, so it sees every
    job committed by the admissions before it and none of those waiting behind it.

    On PostgreSQL the lock, the count and the COMMIT reach the server in one flight
    (``jobs_active_within_limit`` and the COMMIT behind it, :meth:`Statement.execute`
    with ``commit``): the lock is held for the server's work alone. Taken, counted and
    committed in three round trips, it was also held while the client thread waited for
    its turn on the interpreter, several milliseconds under load, and one tenant's
    admissions queued behind that (about 190 per second at most on 2 cores). On SQLite:
    the database's write lock, the count, the commit."""
    session.flush()
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        try:
            _WITHIN_LIMIT.execute(
                connection,
                {"lock_key": tenant_lock_key(tenant), "tenant": tenant, "limit": limit},
                commit=True,
            )
        except DBAPIError as exc:
            code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
            if code == OVER_LIMIT_SQLSTATE:
                raise OverLimit(tenant) from exc
            raise
    else:
        if over_limit_locked(session, tenant, limit):
            raise OverLimit(tenant)
    session.commit()
