"""The job store's busiest statements, run on the database driver's cursor directly.

SQLAlchemy spends far more CPU executing a statement than the driver and the database do:
reading one job row through a Session cost about 1 ms of the API's CPU, the same row from a
psycopg cursor about 0.12 ms; an ORM flush of a new job several times more again. For the
few statements every request runs (a status read, the inserts and the limit check of an
admission), :class:`Statement` keeps SQLAlchemy as the source of the SQL and of the column
types but does the per-execution work itself: the statement is compiled once per dialect
(its SQL text, its parameters in order, the bind and result processors of their types), and
each execution is one ``cursor.execute`` in the caller's connection and transaction.

What SQLAlchemy would still have done around the cursor is kept: values go through the same
type processors both ways (timestamps in UTC on SQLite, JSON), a driver error becomes the
same ``sqlalchemy.exc`` exception (``IntegrityError`` for a duplicate key), and a connection
the error shows to be dead is invalidated so that the pool replaces it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, exc
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

Processor = Callable[[Any], Any] | None


@dataclass(frozen=True)
class _Compiled:
    sql: str
    positional: bool
    # (name in the SQL, name in the caller's parameters or None, fixed value, bind processor)
    binds: tuple[tuple[str, str | None, Any, Processor], ...]
    results: tuple[Processor, ...]


class Statement:
    """A Core statement (``select``, ``insert``, ``text``) executed on the DBAPI cursor.

    Parameters are the ``bindparam`` names of the statement; values written into it (``Job.
    status == "queued"``) are bound as SQLAlchemy would bind them."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled = cast(SQLCompiler, self.statement.compile(dialect=dialect))
        names = list(compiled.positiontup or ()) if compiled.positional else list(compiled.binds)
        binds = []
        for name in names:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.callable is not None or bind.expanding:
                raise TypeError(f"{name}: callable and expanding parameters are not supported")
            key = bind.key if bind.required else None  # else a value written into it
            binds.append((name, key, bind.value, processor))
        results: list[Processor] = []
        for column in getattr(self.statement, "selected_columns", ()):
            results.append(column.type.dialect_impl(dialect).result_processor(dialect, None))
        return _Compiled(compiled.string, compiled.positional, tuple(binds), tuple(results))

    def bound(self, compiled: _Compiled, params: Mapping[str, Any]) -> Any:
        """``params`` as the driver takes them: in the SQL's order or by name, each value
        through its type's bind processor."""
        values = []
        for _, key, fixed, processor in compiled.binds:
            value = params[key] if key is not None else fixed
            values.append(processor(value) if processor is not None else value)
        if compiled.positional:
            return tuple(values)
        return {name: value for (name, *_), value in zip(compiled.binds, values, strict=True)}

    def processed(self, compiled: _Compiled, rows: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The driver's ``rows``, each value through its column type's result processor."""
        return _processed(compiled.results, rows)

    def compiled(self, dialect: Dialect) -> _Compiled:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = self._compile(dialect)
        return compiled

    def execute(
        self,
        connection: Connection,
        params: Mapping[str, Any] | None = None,
        *,
        commit: bool = False,
    ) -> list[tuple[Any, ...]]:
        """Run the statement in ``connection`` (and its transaction, if one is open); the
        rows it returns, each value through its column type's result processor. ``commit``:
        then commit, as :func:`execute_together` does."""
        return execute_together(connection, [(self, params)], commit=commit)[0]

    def run(
        self, session: Session, params: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """:meth:`execute` in ``session``'s transaction, after flushing what the session
        holds (as the session's own queries do with autoflush), so that the statement sees
        the session's pending changes."""
        return run_together(session, [(self, params)])[0]


def execute_together(
    connection: Connection,
    statements: Sequence[tuple[Statement, Mapping[str, Any] | None]],
    *,
    commit: bool = False,
) -> list[list[tuple[Any, ...]]]:
    """Run ``statements`` in order in ``connection``'s transaction and return the rows of
    each. With psycopg they go to the server in one flight (pipeline mode, with the BEGIN
    of a new transaction): one round trip instead of one each; the first that fails stops
    the rest, and its error is raised.

    ``commit``: then commit the driver's transaction. With psycopg the COMMIT goes in the
    same flight and the server runs it right after the last statement, so a lock a
    statement takes is held until the commit with no round trip in between; if a
    statement fails, the COMMIT is not run (the transaction is left failed, for the caller
    to roll back). The caller then ends its SQLAlchemy transaction as usual
    (``session.commit()``: nothing left to send)."""
    dialect = connection.dialect
    prepared = []
    for statement, params in statements:
        compiled = statement.compiled(dialect)
        prepared.append((compiled, statement.bound(compiled, params or {})))
    dbapi_connection = connection.connection.dbapi_connection
    assert dbapi_connection is not None
    cursors = [dbapi_connection.cursor() for _ in prepared]
    together = len(prepared) > 1 or commit
    try:
        with (
            dbapi_connection.pipeline()
            if together and hasattr(dbapi_connection, "pipeline")  # psycopg
            else contextlib.nullcontext()
        ):
            for cursor, (compiled, bound) in zip(cursors, prepared, strict=True):
                cursor.execute(compiled.sql, bound)
            if commit:
                dbapi_connection.commit()
        fetched: list[Sequence[Any]] = [
            cursor.fetchall() if cursor.description is not None else () for cursor in cursors
        ]
    except dialect.loaded_dbapi.Error as error:
        invalidated = dialect.is_disconnect(error, dbapi_connection, None)
        if invalidated:
            connection.invalidate(error)
        raise exc.DBAPIError.instance(
            "; ".join(compiled.sql for compiled, _ in prepared),
            [bound for _, bound in prepared],
            error,
            dialect.loaded_dbapi.Error,
            connection_invalidated=invalidated,
            dialect=dialect,
        ) from error
    finally:
        for cursor in cursors:
            cursor.close()
    return [
        _processed(compiled.results, rows)
        for (compiled, _), rows in zip(prepared, fetched, strict=True)
    ]


def _processed(processors: tuple[Processor, ...], rows: Sequence[Any]) -> list[tuple[Any, ...]]:
    if not any(processors):
        return [tuple(row) for row in rows]
    return [
        tuple(p(v) if p is not None else v for p, v in zip(processors, row, strict=False))
        for row in rows
    ]


def run_together(
    session: Session, statements: Sequence[tuple[Statement, Mapping[str, Any] | None]]
) -> list[list[tuple[Any, ...]]]:
    """:func:`execute_together` in ``session``'s transaction, after flushing it (see
    :meth:`Statement.run`)."""
    if session.autoflush:
        session.flush()  # returns at once when there is nothing to flush
    return execute_together(session.connection(), statements)
