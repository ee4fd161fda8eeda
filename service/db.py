"""Database engine, sessions and migrations of the job store.

Pure SQLAlchemy/Alembic (no FastAPI import), so the worker uses the same code; the
request-scoped session dependency is ``service.api.deps.get_session``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from shortened.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = REPO_ROOT / "alembic.ini"
MIGRATIONS_DIR = REPO_ROOT / "migrations"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, *, pooled: bool = True) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout so the API and the worker
    processes can write the same file. ``pooled=False``: a connection per use, for a process
    that forks (no open connection is ever inherited by a child)."""
    pool: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
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
    return create_engine(url, pool_pre_ping=True, **pool)


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


def upgrade_database(settings: Settings | str, revision: str = "head") -> None:
    """Run ``alembic upgrade head`` against the settings' database."""
    from alembic import command

    url = settings if isinstance(settings, str) else settings.resolved_database_url
    if is_sqlite(url):
        make_engine(url).dispose()  # creates the SQLite file's directory
    command.upgrade(alembic_config(url), revision)
