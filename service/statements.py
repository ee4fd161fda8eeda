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

    def _params(self, compiled: _Compiled, params: Mapping[str, Any]) -> Any:
        values = []
        for _, key, fixed, processor in compiled.binds:
            value = params[key] if key is not None else fixed
            values.append(processor(value) if processor is not None else value)
        if compiled.positional:
            return tuple(values)
        return {name: value for (name, *_), value in zip(compiled.binds, values, strict=True)}

    def execute(
        self,
        connection: Connection,
        params: Mapping[str, Any] | None = None,
        *,
        commit: bool = False,
    ) -> list[tuple[Any, ...]]:
        """Run the statement in ``connection`` (and its transaction, if one is open); the
        rows it returns, each value through its column type's result processor.

        ``commit``: then commit the driver's transaction. With psycopg the statement and the
        COMMIT go to the server together (pipeline mode) and it runs them back to back, so a
        lock the statement takes is held until the commit with no round trip in between;
        if the statement fails, the COMMIT is not run (the transaction is left failed, for
        the caller to roll back). The caller then ends its SQLAlchemy transaction as usual
        (``session.commit()``: nothing left to send)."""
        dialect = connection.dialect
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = self._compile(dialect)
        bound = self._params(compiled, params or {})
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        cursor = dbapi_connection.cursor()
        try:
            if commit and hasattr(dbapi_connection, "pipeline"):  # psycopg: one flight
                with dbapi_connection.pipeline():
                    cursor.execute(compiled.sql, bound)
                    dbapi_connection.commit()
            else:
                cursor.execute(compiled.sql, bound)
            rows: Sequence[Any] = cursor.fetchall() if cursor.description is not None else ()
            if commit:
                dbapi_connection.commit()  # psycopg: committed already, nothing is sent
        except dialect.loaded_dbapi.Error as error:
            invalidated = dialect.is_disconnect(error, dbapi_connection, cursor)
            if invalidated:
                connection.invalidate(error)
            raise exc.DBAPIError.instance(
                compiled.sql,
                bound,
                error,
                dialect.loaded_dbapi.Error,
                connection_invalidated=invalidated,
                dialect=dialect,
            ) from error
        finally:
            cursor.close()
        processors = compiled.results
        if not any(processors):
            return [tuple(row) for row in rows]
        return [
            tuple(p(v) if p is not None else v for p, v in zip(processors, row, strict=False))
            for row in rows
        ]

    def run(
        self, session: Session, params: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """:meth:`execute` in ``session``'s transaction, after flushing what the session
        holds (as the session's own queries do with autoflush), so that the statement sees
        the session's pending changes."""
        if session.autoflush:
            session.flush()  # returns at once when there is nothing to flush
        return self.execute(session.connection(), params)
