"""Statements run on the driver's cursor (``service.statements``) against SQLite and
PostgreSQL: what they write and read is what the ORM writes and reads, driver errors are
SQLAlchemy's, and a dead connection is invalidated so that the pool replaces it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, exc, func, select, text

from service.db import make_engine, make_sessionmaker
from service.models import Job, JobAttempt, JobEvent
from service.statements import Statement, run_together
from service.stores.job_admission import (
    DuplicateIdempotencyKey,
    OverLimit,
    commit_within_limit,
    count_active_jobs,
    create_job,
)
from service.stores.job_reads import read_job
from tests.service.test_db_pool import terminate

SPEC = {"model": "models/m", "num_blocks": 2, "nested": {"list": [1, 2.5, None], "s": "é"}}


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url, pool_size=1)
    yield engine
    engine.dispose()


def test_a_created_job_reads_back_through_the_orm_as_written(engine):
    with make_sessionmaker(engine)() as session:
        job = create_job(session, "prune", SPEC, tenant="acme", idempotency_key="k1")
        job_id, created_at = job.id, job.created_at
    with make_sessionmaker(engine)() as session:
        row = session.get(Job, job_id)
        assert row is not None
        assert (row.kind, row.status, row.tenant, row.spec) == ("prune", "queued", "acme", SPEC)
        assert (row.idempotency_key, row.event_seq, row.dispatch_count) == ("k1", 1, 1)
        assert row.created_at == created_at and row.created_at.tzinfo is not None
        # Columns the insert leaves out are SQL NULL, not JSON null.
        nulls = session.execute(
            text("SELECT result IS NULL, artifacts IS NULL, stage IS NULL FROM jobs WHERE id = :i"),
            {"i": job_id},
        ).one()
        assert all(nulls)
        (event,) = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))
        assert (event.seq, event.type, event.message, event.data) == (
            1,
            "status",
            "queued",
            {"status": "queued"},
        )


def test_the_returned_job_is_the_persistent_row(engine):
    """Callers change the job create_job returns and commit: that is an UPDATE of the row."""
    with make_sessionmaker(engine)() as session:
        job = create_job(session, "prune", SPEC)
        job.status, job.result = "succeeded", {"removed_blocks": [3]}
        session.commit()
        job_id = job.id
    with make_sessionmaker(engine)() as session:
        row = session.get(Job, job_id)
        assert row is not None and (row.status, row.result) == (
            "succeeded",
            {"removed_blocks": [3]},
        )


def job_with_attempts(engine, tenant: str = "acme") -> str:
    """A job with a result, a heartbeat and two attempt rows (inserted out of order)."""
    with make_sessionmaker(engine)() as session:
        job = create_job(session, "prune", SPEC, tenant=tenant)
        job.attempts, job.worker = 2, "w1"
        job.heartbeat_at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        job.result = {"ppl": 12.5, "blocks": [1, 2]}
        for n, outcome in ((2, "running"), (1, "worker_lost")):
            session.add(JobAttempt(job_id=job.id, attempt=n, worker=f"w{n}", outcome=outcome))
        session.commit()
        return job.id


def test_read_job_equals_the_orm_row_with_its_attempts(engine):
    job_id = job_with_attempts(engine)
    read = read_job(engine, job_id)
    assert read is not None
    with make_sessionmaker(engine)() as session:
        row = session.get(Job, job_id)
        assert row is not None
        for column in Job.__table__.c:
            assert getattr(read, column.key) == getattr(row, column.key), column.key
        assert read.heartbeat_at.tzinfo is not None
        assert [(a.attempt, a.worker, a.outcome) for a in read.attempt_rows] == [
            (a.attempt, a.worker, a.outcome) for a in row.attempt_rows
        ]
    assert [a.attempt for a in read.attempt_rows] == [1, 2]
    assert read_job(engine, job_id, tenant="acme") is not None
    assert read_job(engine, job_id, tenant="other") is None
    assert read_job(engine, "0" * 32) is None


def test_a_statement_sees_what_the_session_has_not_flushed(engine):
    with make_sessionmaker(engine)() as session:
        assert count_active_jobs(session, "t") == 0
        now = datetime.now(UTC)
        session.add(Job(id="a" * 32, kind="prune", status="queued", spec={}, tenant="t"))
        session.add(Job(id="b" * 32, kind="prune", status="running", spec={}, tenant="t"))
        session.add(Job(id="c" * 32, kind="prune", status="failed", spec={}, tenant="t"))
        session.add(Job(id="d" * 32, kind="prune", status="queued", spec={}, tenant="u"))
        assert now  # the rows above are pending, not flushed
        assert count_active_jobs(session, "t") == 2  # a literal bound as the ORM binds it
        assert count_active_jobs(session, "t", up_to=1) == 1


def test_a_duplicate_key_raises_sqlalchemys_integrity_error(engine):
    insert = Statement(
        text("INSERT INTO job_events (job_id, seq, type, message) VALUES (:j, :s, 'log', '')")
    )
    with make_sessionmaker(engine)() as session:
        job_id = create_job(session, "prune", SPEC).id
        with pytest.raises(exc.IntegrityError):
            insert.run(session, {"j": job_id, "s": 1})  # (job_id, seq) 1 is the queued event
        session.rollback()
        with pytest.raises(DuplicateIdempotencyKey):
            create_job(session, "prune", SPEC, idempotency_key="same")
            create_job(session, "prune", SPEC, idempotency_key="same")


def test_a_missing_parameter_is_named():
    statement = Statement(select(Job.id).where(Job.id == bindparam("job_id")))
    engine = make_engine("sqlite://")
    with engine.connect() as connection, pytest.raises(KeyError, match="job_id"):
        statement.execute(connection, {})


def test_a_dead_connection_is_invalidated_and_replaced(postgres_url):
    engine = make_engine(postgres_url, pool_size=1)
    pid_of = Statement(text("SELECT pg_backend_pid()"))
    with engine.connect() as connection:
        first = pid_of.execute(connection)[0][0]
    terminate(postgres_url, first)
    with engine.connect() as connection, pytest.raises(exc.DBAPIError) as raised:
        pid_of.execute(connection)
    assert raised.value.connection_invalidated
    with engine.connect() as connection:  # a new connection, no error
        assert pid_of.execute(connection)[0][0] != first
    engine.dispose()


def test_a_statement_and_its_commit_go_together(engine):
    """``commit=True``: committed when the statement succeeds; when it fails, nothing is
    committed and the transaction rolls back (on PostgreSQL both were sent in one flight)."""
    good = Statement(text("SELECT count(*) FROM jobs WHERE kind = :kind"))
    bad = Statement(text("SELECT no_such_column FROM jobs WHERE kind = :kind"))
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        kept = create_job(session, "prune", SPEC, commit=False).id
        assert good.execute(session.connection(), {"kind": "prune"}, commit=True) == [(1,)]
        session.commit()
        lost = create_job(session, "prune", SPEC, commit=False).id
        with pytest.raises(exc.DBAPIError):
            bad.execute(session.connection(), {"kind": "prune"}, commit=True)
        session.rollback()
    with sessions() as session:
        assert session.get(Job, kept) is not None
        assert session.get(Job, lost) is None


def test_commit_within_limit_counts_the_transactions_own_jobs(engine):
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        create_job(session, "prune", SPEC, tenant="t", commit=False)
        create_job(session, "prune", SPEC, tenant="t", commit=False)
        commit_within_limit(session, "t", 2)
        third = create_job(session, "prune", SPEC, tenant="t", commit=False).id
        with pytest.raises(OverLimit):
            commit_within_limit(session, "t", 2)
        session.rollback()
        assert session.get(Job, third) is None
        create_job(session, "prune", SPEC, tenant="other", commit=False)
        commit_within_limit(session, "other", 1)  # another tenant's count
        assert count_active_jobs(session, "t") == 2


def test_statements_run_together_return_each_ones_rows(engine):
    count = Statement(select(func.count()).select_from(Job).where(Job.tenant == bindparam("t")))
    kinds = Statement(select(Job.kind).where(Job.tenant == bindparam("t")).order_by(Job.kind))
    bad = Statement(text("SELECT no_such_column FROM jobs"))
    with make_sessionmaker(engine)() as session:
        create_job(session, "prune", SPEC, tenant="t", commit=False)
        create_job(session, "eval", SPEC, tenant="t", commit=False)
        assert run_together(session, [(count, {"t": "t"}), (kinds, {"t": "t"})]) == [
            [(2,)],
            [("eval",), ("prune",)],
        ]
        with pytest.raises(exc.DBAPIError, match="no_such_column"):
            run_together(session, [(count, {"t": "t"}), (bad, None), (kinds, {"t": "t"})])
        session.rollback()
