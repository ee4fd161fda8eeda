"""Advisory locks of the job store, by name.

PostgreSQL advisory locks are keyed by a number; ``hashtext(:key)`` turns a readable name
(``submit:acme``, ``score-cache:...``) into one, so every caller locking the same name locks
the same thing. SQLite has no such locks and needs none here: it serialises writers on the
database file, which already makes the checks these locks protect atomic.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def xact_lock(session: Session, key: str) -> None:
    """Hold the lock named ``key`` until the session's transaction ends (commit or
    rollback); waits while another transaction holds it. A no-op on SQLite."""
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})


def tenant_lock(session: Session, tenant: str) -> None:
    """Serialise the admissions of one tenant until commit, so that two concurrent ones
    cannot both pass its concurrency limit (every path that creates jobs takes it)."""
    xact_lock(session, f"submit:{tenant}")


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
