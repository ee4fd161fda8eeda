"""Status reads on the event loop (``service.async_reads``) against PostgreSQL: they return
what the thread path returns, keep their connections for the next read, stay within their
pool, survive a connection the server dropped, and raise SQLAlchemy's errors; the API's
``GET /jobs/{id}`` takes this path on PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import exc, text

from service.async_reads import AsyncReads, pool_size
from service.db import make_engine
from service.models import Job
from service.stores.job_reads import read_job, read_job_async
from shortened.config import Settings
from tests.service.test_db_pool import terminate
from tests.service.test_statements import SPEC, job_with_attempts


@pytest.fixture
def engine(postgres_url):
    yield (engine := make_engine(postgres_url, pool_size=1))
    engine.dispose()


def _run(engine, size, read):
    """``read(reads)`` on a fresh pool and loop; the pool is closed afterwards."""

    async def main():
        reads = AsyncReads.for_engine(engine, size)
        assert reads is not None
        try:
            return await read(reads)
        finally:
            await reads.close()

    return asyncio.run(main())


def _backend_pid(reads):
    from service.statements import Statement

    statement = Statement(text("SELECT pg_backend_pid()"))

    async def read(reader):
        return (await reader.rows(statement))[0][0]

    return reads.run(read)


def test_a_read_returns_what_the_thread_path_returns(engine):
    job_id = job_with_attempts(engine)
    plain = read_job(engine, job_id)

    async def reads_of(reads):
        return (
            await read_job_async(reads, job_id),
            await read_job_async(reads, job_id, tenant="acme"),
            await read_job_async(reads, job_id, tenant="other"),
            await read_job_async(reads, "0" * 32),
        )

    read, scoped, other, unknown = _run(engine, 2, reads_of)
    assert read is not None and plain is not None and scoped is not None
    for column in Job.__table__.c:
        assert getattr(read, column.key) == getattr(plain, column.key), column.key
    assert read.heartbeat_at.tzinfo is not None and read.spec == SPEC
    assert [vars(a) for a in read.attempt_rows] == [vars(a) for a in plain.attempt_rows]
    assert [a.attempt for a in read.attempt_rows] == [1, 2]
    assert other is None and unknown is None


def test_reads_reuse_their_connections_and_stay_within_the_pool(engine):
    async def reads_of(reads):
        first = await _backend_pid(reads)
        again = [await _backend_pid(reads) for _ in range(5)]
        at_once = await asyncio.gather(*(_backend_pid(reads) for _ in range(20)))
        return first, again, at_once

    first, again, at_once = _run(engine, 3, reads_of)
    assert again == [first] * 5  # one read at a time: the same connection every time
    assert len(set(at_once)) <= 3  # twenty at once: no more connections than the pool's size


def test_a_connection_the_server_dropped_is_replaced_and_the_read_succeeds(engine, postgres_url):
    async def reads_of(reads):
        first = await _backend_pid(reads)
        terminate(postgres_url, first)
        second = await _backend_pid(reads)  # no error: read again on a new connection
        return first, second, await _backend_pid(reads)

    first, second, third = _run(engine, 2, reads_of)
    assert second != first and third == second


def test_errors_are_sqlalchemy_errors(engine, postgres_url):
    from service.statements import Statement

    bad = Statement(text("SELECT no_such_column FROM jobs"))

    async def failing(reads):
        async def read(reader):
            return await reader.rows(bad)

        with pytest.raises(exc.ProgrammingError, match="no_such_column"):
            await reads.run(read)
        return await _backend_pid(reads)  # the pool still serves reads afterwards

    assert _run(engine, 2, failing) > 0
    unreachable = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test")
    with pytest.raises(exc.OperationalError):
        _run(unreachable, 2, _backend_pid)
    unreachable.dispose()


def test_sqlite_has_no_pool(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    assert AsyncReads.for_engine(engine, 4) is None
    assert [pool_size(n) for n in (1, 8, 16, 64)] == [2, 2, 4, 16]


def test_the_status_route_reads_on_the_loop_with_postgresql(engine, postgres_url, tmp_path):
    job_id = job_with_attempts(engine, tenant="default")
    from service.main import create_app

    settings = Settings(
        database_url=postgres_url,
        data_dir=tmp_path / "var",
        broker_url="filesystem://",
        reaper_interval_s=0,
        scheduler_interval_s=0,
        webhook_interval_s=0,
    )
    app = create_app(settings)
    with TestClient(app, client=("127.0.0.1", 50000)) as client:
        reads = app.state.reads
        assert isinstance(reads, AsyncReads)
        response = client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["id"] == job_id and body["spec"] == SPEC
        assert [a["attempt"] for a in body["attempt_history"]] == [1, 2]
        assert len(reads._idle) == 1  # the read's connection, back in the pool
        assert client.get(f"/jobs/{'0' * 32}").status_code == 404
    assert app.state.reads is None and reads._idle == []  # closed with the app
