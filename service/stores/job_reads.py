"""The API's reads of jobs: one job (``get_job``, the ORM object; ``read_job`` and
``read_job_async``, the lean read of ``GET /jobs/{id}``), a page of a tenant's jobs, a job's
attempts, and the worker's cheap status look-up.

Reads take a ``tenant`` scope: None means every tenant's (an admin, the worker), otherwise
another tenant's job is treated exactly like an unknown id.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Engine, bindparam, select
from sqlalchemy.orm import Session

from service.models import Job, JobAttempt, JobRow
from service.statements import Statement
from service.stores.paging import newest_first

if TYPE_CHECKING:
    from service.async_reads import AsyncReads, Reader

T = TypeVar("T")

_JOB_COLUMNS = tuple(Job.__table__.c)
_JOB_KEYS = tuple(c.key for c in _JOB_COLUMNS)


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


Rows = Callable[[Statement, Mapping[str, Any]], Awaitable[list[tuple[Any, ...]]]]


async def _read(rows: Rows, job_id: str, tenant: str | None) -> JobRow | None:
    """The status read, written once for both executors (``rows`` runs one statement): the
    row, then its attempt history only when it has one (``attempts`` is counted up in the
    transaction that inserts each attempt row)."""
    found = await rows(_READ_JOB, {"job_id": job_id})
    if not found:
        return None
    job = JobRow(**dict(zip(_JOB_KEYS, found[0], strict=True)))
    if tenant is not None and job.tenant != tenant:
        return None
    attempts = await rows(_READ_ATTEMPTS, {"job_id": job_id}) if job.attempts else []
    job.attempt_rows = [
        SimpleNamespace(**dict(zip(_ATTEMPT_KEYS, a, strict=True))) for a in attempts
    ]
    return job


def read_job(engine: Engine, job_id: str, tenant: str | None = None) -> JobRow | None:
    """The job for a response (``GET /jobs/{id}``, which clients poll), None when unknown or
    (with ``tenant``) another tenant's, on a connection in autocommit (no BEGIN/ROLLBACK
    round trips; each statement still sees only committed rows) through
    :class:`service.statements.Statement`."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:

        async def rows(statement: Statement, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
            return statement.execute(connection, params)

        return _completed(_read(rows, job_id, tenant))


async def read_job_async(
    reads: AsyncReads, job_id: str, tenant: str | None = None
) -> JobRow | None:
    """:func:`read_job` on the event loop (PostgreSQL, see ``service.async_reads``): the same
    statements through the pool's connections."""

    async def read(reader: Reader) -> JobRow | None:
        return await _read(reader.rows, job_id, tenant)

    return await reads.run(read)


def _completed(read: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (each of its awaits completes at once,
    as the sync executor's do), run on the calling thread without an event loop."""
    try:
        read.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    read.close()
    raise RuntimeError("a synchronous read suspended")


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


def list_attempts(session: Session, job_id: str) -> list[JobAttempt]:
    return list(
        session.scalars(
            select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.attempt)
        )
    )
