"""Reads and writes of the job store, shared by the API and the worker.

State transitions are compare-and-set UPDATEs (``... WHERE status = 'queued'``), so the
API cancelling a job and a worker starting it cannot both win, and a redelivered task
message finds the job no longer queued.

Each claim starts a numbered attempt (``jobs.attempts`` and a ``job_attempts`` row) with a
lease. Every write of the worker is fenced by its attempt number: once the reaper has
re-queued a job whose lease expired, the old attempt can neither report progress nor finish
it, so one job never has two live runs.

Job error messages and event messages/data are written through ``shortened.redact``: what a
tenant reads never holds a traceback, a server path or a library version (the worker logs
the full text with the job id).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from sqlalchemy import (
    CursorResult,
    Engine,
    Integer,
    Result,
    Select,
    String,
    and_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, configure_mappers, make_transient_to_detached
from sqlalchemy.orm.attributes import instance_dict, set_committed_value

from service.jsonsafe import json_safe
from service.locks import tenant_lock, tenant_lock_key
from service.models import FINISHED_STATUSES, Job, JobAttempt, JobEvent, JobRow, utcnow
from service.statements import Statement, run_together
from shortened.redact import redact, redact_data

if TYPE_CHECKING:
    from service.async_reads import AsyncReads, Reader


class InvalidCursor(ValueError):
    pass


class DuplicateIdempotencyKey(Exception):
    """Another job of the tenant was created with the same Idempotency-Key."""


class JobFinished(Exception):
    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} is already {job.status}")
        self.job = job


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
        from service.webhooks.outbox import enqueue_status_change

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


# ---------------------------------------------------------------------------- API side


_JOB_COLUMNS = tuple(Job.__table__.c)
_JOB_KEYS = tuple(c.key for c in _JOB_COLUMNS)
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
    from service.webhooks.outbox import ENDPOINTS, enqueue_status_change

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


def reload(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job


def job_status(session: Session, job_id: str) -> str | None:
    """The job's status alone (None for an unknown id): the worker's cheap look-up before it
    gives a message a pool slot."""
    return session.scalar(select(Job.status).where(Job.id == job_id))


def get_job(session: Session, job_id: str, tenant: str | None = None) -> Job | None:
    """The job, or None when unknown or (with ``tenant``) owned by another tenant."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or (tenant is not None and job.tenant != tenant):
        return None
    return job


_READ_JOB = Statement(select(*_JOB_COLUMNS).where(Job.id == bindparam("job_id")))
_ATTEMPT_COLUMNS = (
    JobAttempt.attempt,
    JobAttempt.worker,
    JobAttempt.started_at,
    JobAttempt.ended_at,
    JobAttempt.outcome,
    JobAttempt.error_code,
)
_READ_ATTEMPTS = Statement(
    select(*_ATTEMPT_COLUMNS)
    .where(JobAttempt.job_id == bindparam("job_id"))
    .order_by(JobAttempt.attempt)
)
_ATTEMPT_KEYS = tuple(c.key for c in _ATTEMPT_COLUMNS)


def read_job(engine: Engine, job_id: str, tenant: str | None = None) -> JobRow | None:
    """The job for a response (``GET /jobs/{id}``, which clients poll), None when unknown or
    (with ``tenant``) another tenant's: the row, then its attempt history only when it has
    one (``attempts`` is counted up in the transaction that inserts each attempt row), on a
    connection in autocommit (no BEGIN/ROLLBACK round trips; each statement still sees only
    committed rows) through :class:`service.statements.Statement`."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        job = _job_row(_READ_JOB.execute(connection, {"job_id": job_id}), tenant)
        if job is None:
            return None
        attempts = _READ_ATTEMPTS.execute(connection, {"job_id": job_id}) if job.attempts else []
    return _with_attempts(job, attempts)


async def read_job_async(
    reads: AsyncReads, job_id: str, tenant: str | None = None
) -> JobRow | None:
    """:func:`read_job` on the event loop (PostgreSQL, see ``service.async_reads``)."""

    async def read(reader: Reader) -> JobRow | None:
        job = _job_row(await reader.rows(_READ_JOB, {"job_id": job_id}), tenant)
        if job is None:
            return None
        attempts = await reader.rows(_READ_ATTEMPTS, {"job_id": job_id}) if job.attempts else []
        return _with_attempts(job, attempts)

    return await reads.run(read)


def _job_row(rows: list[tuple[Any, ...]], tenant: str | None) -> JobRow | None:
    if not rows:
        return None
    job = JobRow(**dict(zip(_JOB_KEYS, rows[0], strict=True)))
    if tenant is not None and job.tenant != tenant:
        return None
    return job


def _with_attempts(job: JobRow, attempts: list[tuple[Any, ...]]) -> JobRow:
    job.attempt_rows = [
        SimpleNamespace(**dict(zip(_ATTEMPT_KEYS, a, strict=True))) for a in attempts
    ]
    return job


class Paged(Protocol):
    """A row listed newest first, one page at a time: by (created_at, id)."""

    created_at: Any
    id: Any


def encode_cursor(row: Paged) -> str:
    raw = json.dumps({"t": row.created_at.isoformat(), "id": row.id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        created_at = datetime.fromisoformat(data["t"])
        row_id = str(data["id"])
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidCursor("invalid cursor") from exc
    if created_at.tzinfo is None:
        raise InvalidCursor("invalid cursor")
    return created_at, row_id


def newest_first(
    session: Session, query: Select[Any], model: Any, *, limit: int, after: str | None
) -> tuple[list[Any], str | None]:
    """One page of ``query``'s rows of ``model``, newest first, and the cursor of the next
    page (None on the last). Ordered by (created_at, id), so that pages never overlap or
    skip, whatever is inserted meanwhile. Raises ``InvalidCursor``."""
    if after:
        created_at, row_id = decode_cursor(after)
        query = query.where(
            or_(
                model.created_at < created_at,
                and_(model.created_at == created_at, model.id < row_id),
            )
        )
    query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def list_jobs(
    session: Session,
    *,
    kind: str | None = None,
    status: str | None = None,
    limit: int = 50,
    after: str | None = None,
    tenant: str | None = None,
) -> tuple[list[Job], str | None]:
    """Newest first, one page at a time (see ``newest_first``)."""
    query = select(Job)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if status is not None:
        query = query.where(Job.status == status)
    return newest_first(session, query, Job, limit=limit, after=after)


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


# ---------------------------------------------------------------------------- worker side


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
    return reload(session, job_id)


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
    return bool(_rowcount(renewed))


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
    if _rowcount(finished):
        data: dict[str, Any] = {"status": status}
        if error_code:
            data["code"] = error_code
        append_event(session, job_id, "status", message, data)
        outcome = error_code if error_code in ("timeout", "worker_lost") else status
        _end_attempt(session, job_id, current, outcome, error_code, now)
    session.commit()
    return bool(_rowcount(finished))


def _end_attempt(
    session: Session,
    job_id: str,
    attempt: int,
    outcome: str,
    error_code: str | None,
    now: datetime,
) -> None:
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


# ---------------------------------------------------------------------------- reaper side


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
        if not _rowcount(changed):
            continue
        data: dict[str, Any] = {"status": status, "attempt": attempt, "reason": "worker_lost"}
        if code:
            data["code"] = code
        append_event(session, job_id, "status", message, data)
        _end_attempt(session, job_id, attempt, code or "worker_lost", code, now)
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
        if _rowcount(changed):
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
    if warning is not None and _rowcount(marked):
        append_event(session, job_id, "warning", warning, {"reason": "broker_unavailable"})
    session.commit()


def list_attempts(session: Session, job_id: str) -> list[JobAttempt]:
    return list(
        session.scalars(
            select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.attempt)
        )
    )


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
    return _rowcount(expired)


def requeue_for_shutdown(session: Session, job_id: str, worker: str) -> bool:
    """running -> queued because the worker running it (``worker``, as it claimed the job) is
    shutting down: the attempt ends without counting as a failure of the job, and the
    attempt's next progress report tells it to stop. False if that worker no longer holds
    the job."""
    now = utcnow()
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.worker == worker)
        # No message now: the stopping worker may still be consuming and would take it back.
        # dispatched_at NULL puts it first in the reaper's next re-dispatch round.
        .values(**{**_requeued(now), "dispatched_at": None})
        .returning(Job.attempts)
        .execution_options(synchronize_session=False)
    ).scalar()
    if attempt is None:
        session.rollback()
        return False
    message = f"re-queued: the worker of attempt {attempt} shut down"
    append_event(
        session,
        job_id,
        "status",
        message,
        {"status": "queued", "attempt": attempt, "reason": "worker_shutdown"},
    )
    _end_attempt(session, job_id, attempt, "worker_shutdown", None, now)
    session.commit()
    return True
