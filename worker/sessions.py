"""The worker's job-store sessions and cross-worker locks.

One sessionmaker per process and database (a connection pool must never be shared across a
fork), and the lock factory the block-score cache uses so that two workers never score the
same weights at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.db import make_engine, make_sessionmaker
from service.locks import session_lock
from shortened.config import Settings

_sessionmakers: dict[tuple[int, str], sessionmaker[Session]] = {}


def session_factory(settings: Settings) -> sessionmaker[Session]:
    # Keyed by pid: a connection pool must never be shared across a fork.
    key = (os.getpid(), settings.resolved_database_url)
    if key not in _sessionmakers:
        _sessionmakers[key] = make_sessionmaker(make_engine(settings.resolved_database_url))
    return _sessionmakers[key]


def score_lock_factory(settings: Settings) -> Callable[[str, Callable[[], None]], Any]:
    """A lock per score-cache key that spans workers: a PostgreSQL session advisory lock
    (released by the server if the worker dies), or a file lock next to the embedded
    SQLite database (one machine)."""
    from shortened.engine.score_cache import file_lock

    url = settings.resolved_database_url
    if not url.startswith("postgresql"):
        return lambda key, on_wait: file_lock(settings.data_dir / "locks" / f"{key}.lock", on_wait)
    engine = session_factory(settings).kw["bind"]
    # on_wait reports progress, and raises Cancelled when the job is cancelled meanwhile.
    return lambda key, on_wait: session_lock(engine, f"score-cache:{key}", on_wait)
