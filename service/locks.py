"""Advisory locks of the job store, by name.

PostgreSQL advisory locks are keyed by a number; ``hashtext(:key)`` turns a readable name
(``submit:acme``, ``score-cache:...``) into one, so every caller locking the same name locks
the same thing.

SQLite has no named locks, only one write lock for the whole file, and the driver begins a
transaction lazily, at its first write: a count read before it is read outside any
transaction and may be stale by the time the insert commits (two submissions could both pass
a limit). So there a transaction lock takes the database's write lock at once, with a write
that changes nothing; the reads after it see every committed row, and other writers wait
(busy timeout) until the commit. Coarser than a per-tenant lock, which costs little in
embedded mode, where one machine's jobs go through one file anyway.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from service.statements import Statement


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


_PG_XACT_LOCK = Statement(text("SELECT pg_advisory_xact_lock(hashtext(:key))"))
_SQLITE_WRITE_LOCK = Statement(text("UPDATE jobs SET id = id WHERE 0"))


def xact_lock(session: Session, key: str) -> None:
    """Hold the lock named ``key`` until the session's transaction ends (commit or
    rollback); waits while another transaction holds it. On SQLite: the database's write
    lock, whatever the key (see the module docstring). Every admission takes one, so it
    runs as a :class:`service.statements.Statement`."""
    if is_postgres(session):
        _PG_XACT_LOCK.run(session, {"key": key})
    else:
        _SQLITE_WRITE_LOCK.run(session)


def tenant_lock_key(tenant: str) -> str:
    return f"submit:{tenant}"


def tenant_lock(session: Session, tenant: str) -> None:
    """Serialise the admissions of one tenant until commit, so that two concurrent ones
    cannot both pass its concurrency limit (every path that creates jobs takes it, here or
    in ``job_admission.commit_within_limit``)."""
    xact_lock(session, tenant_lock_key(tenant))


def _try_lock(connection: Connection, key: str) -> bool:
    return bool(
        connection.execute(
            text("SELECT pg_try_advisory_lock(hashtext(:key))"), {"key": key}
        ).scalar()
    )


@contextlib.contextmanager
def session_lock(
    engine: Engine, key: str, on_wait: Callable[[], None], poll_s: float = 1.0
) -> Iterator[None]:
    """Hold the PostgreSQL lock named ``key`` on a connection of its own for the ``with``
    block, across transactions; the server releases it if the process dies. Polls instead
    of blocking so that ``on_wait`` runs while waiting (it may raise to give up)."""
    with engine.connect() as connection:
        while not _try_lock(connection, key):
            connection.rollback()
            on_wait()
            time.sleep(poll_s)
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(hashtext(:key))"), {"key": key})
            connection.commit()
