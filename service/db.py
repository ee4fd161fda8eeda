"""Database engine, sessions and migrations of the job store.

Pure SQLAlchemy/Alembic (no FastAPI import), so the worker uses the same code; the
request-scoped session dependency is ``service.api.deps.get_session``.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from shortened.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = REPO_ROOT / "alembic.ini"
MIGRATIONS_DIR = REPO_ROOT / "migrations"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, *, pooled: bool = True, pool_size: int = 5) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout so the API and the worker
    processes can write the same file. ``pool_size``: connections kept open (the API keeps
    one per request thread: a connection opened for a burst and closed after it costs
    PostgreSQL a backend process each time, several times the request itself).
    ``pooled=False``: a connection per use, for a process that forks (no open connection is
    ever inherited by a child)."""
    pool: dict[str, Any] = {"pool_size": pool_size} if pooled else {"poolclass": NullPool}
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    engine = create_engine(url, **pool)
    ping_when_idle(engine)
    return engine


# A pooled connection unused for longer than this is pinged before it is handed out.
PING_IF_IDLE_S = 5.0


def ping_when_idle(engine: Engine, idle_s: float | None = None) -> None:
    """SQLAlchemy's ``pool_pre_ping``, but only for a connection that sat in the pool for
    ``idle_s`` or more. Connections die while idle (a database restart, a proxy's or
    firewall's idle timeout); a connection handed back a moment ago is alive, and pinging it
    anyway cost a round trip and about 1 ms of CPU on every request (half of a status
    read). A dead idle connection is replaced before use, as with pre-ping; the rare one
    that dies between two requests in quick succession fails that request, and SQLAlchemy
    then discards the whole pool (a disconnect invalidates every pooled connection)."""

    idle_s = PING_IF_IDLE_S if idle_s is None else idle_s

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < idle_s:
            return  # new (just connected) or in use a moment ago
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            raise exc.DisconnectionError(f"pooled connection lost while idle: {error}") from error
        if not alive:
            raise exc.DisconnectionError("pooled connection lost while idle")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: rows are serialised to responses after the commit.
    return sessionmaker(engine, expire_on_commit=False)


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def alembic_config(database_url: str) -> Any:
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not a main option: configparser would interpolate '%'
    # in URL-encoded passwords. env.py also skips logging setup when this is set.
    config.attributes["database_url"] = database_url
    return config


class SchemaBehind(RuntimeError):
    """The job store's schema is older than this version's migrations."""


@functools.cache
def migration_revisions() -> tuple[str, frozenset[str]]:
    """The head and every revision of the migrations this version ships."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(""))
    head = script.get_current_head()
    assert head is not None
    return head, frozenset(r.revision for r in script.walk_revisions())


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaBehind` when the database has not been migrated to this version's
    head (``/readyz`` reports it: with PostgreSQL, migrating is a deploy step). A revision
    this version does not know is a later version's, which migrated first: not an error
    (old replicas keep serving during a rolling update)."""
    head, known = migration_revisions()
    with engine.connect() as connection:
        try:
            current = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except exc.DBAPIError:
            current = None  # not migrated at all
    if current == head or (current is not None and current not in known):
        return
    raise SchemaBehind(
        f"the database schema is at revision {current or 'none'}, this version needs {head}: "
        "run the migrations (alembic upgrade head)"
    )


def upgrade_database(settings: Settings | str, revision: str = "head") -> None:
    """Run ``alembic upgrade head`` against the settings' database."""
    from alembic import command

    url = settings if isinstance(settings, str) else settings.resolved_database_url
    if is_sqlite(url):
        make_engine(url).dispose()  # creates the SQLite file's directory
    command.upgrade(alembic_config(url), revision)
