"""The job store's connection pool on PostgreSQL: a connection that sat idle is checked before
use and replaced when the server dropped it; one used a moment ago is handed out unchecked."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import exc, text

import service.db
from service.db import make_engine

IDLE_S = 0.3


@pytest.fixture
def engine(postgres_url, monkeypatch):
    monkeypatch.setattr(service.db, "PING_IF_IDLE_S", IDLE_S)
    engine = make_engine(postgres_url, pool_size=1)
    pings: list[int] = []
    real_ping = engine.dialect.do_ping

    def counted(dbapi_connection):
        pings.append(1)
        return real_ping(dbapi_connection)

    engine.dialect.do_ping = counted  # type: ignore[method-assign]
    engine.pings = pings  # type: ignore[attr-defined]
    yield engine
    engine.dispose()


def backend_pid(engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def terminate(postgres_url: str, pid: int) -> None:
    other = make_engine(postgres_url, pooled=False)
    with other.connect() as connection:
        # With a timeout the call returns once the backend has exited, not just been signalled.
        assert connection.execute(text(f"SELECT pg_terminate_backend({pid}, 10000)")).scalar_one()
    other.dispose()


def test_a_connection_in_use_a_moment_ago_is_not_pinged(engine):
    first = backend_pid(engine)
    for _ in range(20):
        assert backend_pid(engine) == first  # the same pooled connection every time
    assert engine.pings == []


def test_an_idle_connection_dropped_by_the_server_is_replaced_before_use(engine, postgres_url):
    first = backend_pid(engine)
    terminate(postgres_url, first)
    time.sleep(IDLE_S + 0.1)
    second = backend_pid(engine)  # no error: the ping found it dead, a new one was made
    assert second != first
    assert len(engine.pings) == 1


def test_a_connection_dropped_right_after_use_fails_one_request_then_recovers(engine, postgres_url):
    first = backend_pid(engine)
    terminate(postgres_url, first)
    with pytest.raises(exc.OperationalError):
        backend_pid(engine)  # within the idle window: used without a ping, as documented
    assert backend_pid(engine) != first  # the disconnect invalidated the pool
    assert engine.pings == []
