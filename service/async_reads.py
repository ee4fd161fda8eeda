"""Reads on the event loop, for the status read (``GET /jobs/{id}``) on PostgreSQL.

A sync route runs on a worker thread, and the hand-over (to the thread and back to the loop)
cost about 0.25 ms of the API's CPU per request: a quarter of a status read, which clients
poll. Here the read's statements run on the loop itself through psycopg's asyncio
connections, about 0.1 ms each: the same :class:`service.statements.Statement` (its SQL, its
parameters and its type processors, compiled once by SQLAlchemy), a driver error raised as
the same ``sqlalchemy.exc`` exception.

The connections are this module's own small pool, opened when first needed and kept: a
read holds one for a round trip, not for a whole request, so a quarter of the thread
pool's size serves more reads than the process can parse. They are in autocommit (a read
sees committed rows, with no BEGIN/ROLLBACK round trips). A connection the server dropped
(a restart, an idle timeout, a terminated backend) makes its read fail as broken; every
idle connection is then dropped too (they went the same way, as a disconnect invalidates
SQLAlchemy's pool) and the read, which changes nothing, runs once more on a new one.

On SQLite (embedded mode) there is no pool: callers read on a worker thread as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, exc
from sqlalchemy.engine import Dialect

from service.statements import Statement

log = logging.getLogger(__name__)

T = TypeVar("T")


def pool_size(api_threads: int) -> int:
    """Connections for the reads of one API process: a quarter of its thread pool's, at least
    two (see the module's documentation)."""
    return max(2, api_threads // 4)


class Reader:
    """One pooled connection, for the statements of one read."""

    def __init__(self, connection: psycopg.AsyncConnection[Any], dialect: Dialect) -> None:
        self._connection = connection
        self._dialect = dialect

    async def rows(
        self, statement: Statement, params: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """The rows of a SELECT ``statement``, each value through its column's result
        processor (what ``Statement.execute`` returns for it on a sync connection)."""
        compiled = statement.compiled(self._dialect)
        async with self._connection.cursor() as cursor:
            await cursor.execute(compiled.sql, statement.bound(compiled, params or {}))
            rows = await cursor.fetchall()
        return statement.processed(compiled, rows)


class AsyncReads:
    """A pool of psycopg ``AsyncConnection`` for reads on the event loop; see the module's
    documentation. Made and closed on the loop that uses it (the app's lifespan)."""

    def __init__(self, engine: Engine, size: int) -> None:
        self.dialect = engine.dialect
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        self._connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]] = lambda: (
            psycopg.AsyncConnection.connect(*args, **{**kwargs, "autocommit": True})
        )
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    @classmethod
    def for_engine(cls, engine: Engine, size: int) -> AsyncReads | None:
        """The pool for ``engine``'s database, or None where reads stay on threads (SQLite,
        a driver other than psycopg)."""
        dialect = engine.dialect
        if dialect.name != "postgresql" or dialect.driver != "psycopg":
            return None
        return cls(engine, size)

    async def run(self, read: Callable[[Reader], Awaitable[T]]) -> T:
        """``read`` on a pooled connection; once more on a new connection if the first turns
        out to be broken. Driver errors are raised as ``sqlalchemy.exc.DBAPIError``."""
        for attempt in (1, 2):
            async with self._slots:
                connection = self._idle.pop() if self._idle else None
                try:
                    if connection is None:
                        connection = await self._connect()
                    result = await read(Reader(connection, self.dialect))
                except psycopg.Error as error:
                    if connection is None:  # could not connect: nothing to read again on
                        lost = True
                    else:
                        lost = connection.broken
                        await self._discard(connection)
                        if lost:  # the idle ones went the same way
                            await self._discard_idle()
                            if attempt == 1:
                                log.info("status read: connection lost (%s), reading again", error)
                                continue
                    raise exc.DBAPIError.instance(
                        None, None, error, psycopg.Error, connection_invalidated=lost,
                        dialect=self.dialect,
                    ) from error  # fmt: skip
                except BaseException:  # cancelled mid-read: the connection's state is unknown
                    if connection is not None:
                        await self._discard(connection)
                    raise
                if self._closed:
                    await self._discard(connection)
                else:
                    self._idle.append(connection)
                return result
        raise AssertionError("unreachable")  # the second attempt returns or raises

    async def _discard(self, connection: psycopg.AsyncConnection[Any]) -> None:
        try:
            await connection.close()
        except Exception:  # closing a broken connection may fail too: it is gone either way
            pass

    async def _discard_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._discard(connection)

    async def close(self) -> None:
        self._closed = True
        await self._discard_idle()
