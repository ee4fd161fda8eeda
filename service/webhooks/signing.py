"""Signing secrets (Standard Webhooks ``whsec_``) and ids."""

from __future__ import annotations

import base64
import logging
import secrets
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import (
    WebhookSigningSecret,
    utcnow,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_delivery_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def new_endpoint_id() -> str:
    return uuid.uuid4().hex


def _upsert(session: Session, values: dict[str, Any], update_on_conflict: bool) -> None:
    table = WebhookSigningSecret
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt: Any = pg_insert(table).values(**values)
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(table).values(**values)
    else:  # pragma: no cover - the job store is SQLite or PostgreSQL
        raise RuntimeError(f"unsupported database {dialect}")
    if update_on_conflict:
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant"],
            set_={"secret": values["secret"], "created_at": values["created_at"]},
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=["tenant"])
    session.execute(stmt)


def tenant_signing_secret(session: Session, tenant: str) -> str:
    """The tenant's secret for per-job callbacks, created on first use (the caller commits).
    Concurrent first uses agree: the insert is ON CONFLICT DO NOTHING, then read back."""
    secret = session.scalar(
        select(WebhookSigningSecret.secret).where(WebhookSigningSecret.tenant == tenant)
    )
    if secret is not None:
        return secret
    _upsert(
        session,
        {"tenant": tenant, "secret": new_secret(), "created_at": utcnow()},
        update_on_conflict=False,
    )
    secret = session.scalar(
        select(WebhookSigningSecret.secret).where(WebhookSigningSecret.tenant == tenant)
    )
    assert secret is not None
    return secret


def rotate_signing_secret(session: Session, tenant: str) -> WebhookSigningSecret:
    """A new signing secret for the tenant's per-job callbacks, replacing the old one at once
    (messages not yet sent are signed with the new one). Commits."""
    now = utcnow()
    _upsert(session, {"tenant": tenant, "secret": new_secret(), "created_at": now}, True)
    session.commit()
    row = session.get(WebhookSigningSecret, tenant, populate_existing=True)
    assert row is not None
    return row
