"""Alembic environment: the URL comes from the caller (``service.db.upgrade_database``)
or from Settings (``SHORTENED_DATABASE_URL``), never from alembic.ini."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from service.db import is_sqlite, make_engine
from service.models import Base
from shortened.config import Settings

config = context.config
programmatic = "database_url" in config.attributes

# Only the alembic CLI configures logging; called from the API it would replace
# uvicorn's logging setup.
if not programmatic and config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    return config.attributes.get("database_url") or Settings().resolved_database_url


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=is_sqlite(url),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = database_url()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER most things; batch mode recreates the table.
                render_as_batch=is_sqlite(url),
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
