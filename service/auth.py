"""API keys and the caller's identity.

A key is ``sk_`` + 43 random URL-safe characters (256 bits); only its sha256 is stored, so a
leaked database does not leak usable keys (a fast hash is enough for random 256-bit
secrets: there is nothing to brute-force). Each key maps to a tenant and a role:

* ``member``: sees and manages only its tenant's jobs, events and artifacts;
* ``admin``: sees every tenant's jobs (listing included).

Without ``Authorization`` the request is refused, except in the embedded local mode
(``auth_required`` false, which is only allowed on a loopback bind): there it acts as an
admin of ``default_tenant``, and only for clients connecting from this machine.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.errors import APIError
from service.models import ROLES, ApiKey, utcnow
from service.ratelimit import charge_write

KEY_PREFIX = "sk_"


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: str
    key_id: str | None = None  # None: the keyless local mode

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def scope(self) -> str | None:
        """The tenant whose rows this caller may see, or None for all (admins)."""
        return None if self.is_admin else self.tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(
    session: Session, tenant: str, role: str = "member", name: str | None = None
) -> tuple[ApiKey, str]:
    """Store a new key for ``tenant`` and return (row, the key itself: shown once only)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    tenant = tenant.strip()
    if not tenant or len(tenant) > 64:
        raise ValueError("tenant must be 1 to 64 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=uuid.uuid4().hex,
        key_hash=hash_key(key),
        tenant=tenant,
        role=role,
        name=name,
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    return row, key


def lookup_key(session: Session, key: str) -> ApiKey | None:
    """The active key row for a presented key (by its hash), or None."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    return session.scalars(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).first()


def revoke_api_key(session: Session, key_id: str) -> bool:
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    session.commit()
    return bool(getattr(result, "rowcount", 0))


def list_api_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    return list(session.scalars(query))


def _is_local_client(host: str | None) -> bool:
    # Test clients and Unix sockets have no IP address: they are local by construction.
    if not host:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer sk_...`")

UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """Who is calling: from the bearer key, or the local mode's implicit admin."""
    settings = request.app.state.settings
    if credentials is not None:
        with request.app.state.sessionmaker() as session:
            row = lookup_key(session, credentials.credentials)
        if row is None:
            raise APIError(401, "unauthorized", "invalid or revoked API key", UNAUTHORIZED)
        principal = Principal(tenant=row.tenant, role=row.role, key_id=row.id)
    elif settings.resolved_auth_required:
        raise APIError(
            401, "unauthorized", "an API key is required: Authorization: Bearer <key>", UNAUTHORIZED
        )
    elif not _is_local_client(request.client.host if request.client else None):
        # auth_required is off only on loopback binds; a proxy in front must not turn
        # that into an open API.
        raise APIError(
            401, "unauthorized", "API keys are required for non-local clients", UNAUTHORIZED
        )
    else:
        principal = Principal(tenant=settings.default_tenant, role="admin")
    request.state.principal = principal
    charge_write(request, principal.tenant)  # every authenticated write, one bucket a tenant
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
