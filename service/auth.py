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
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
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
    """Revoke a key: refused at once by this process, and by the other API processes and
    replicas once their cached look-up expires (``KEY_CACHE_TTL_S``)."""
    _key_cache.forget(key_id)
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


# How long a key found in the job store is trusted without asking again: every request
# carries its key, and a look-up per request would be a database round trip per request. A key
# revoked by ``python -m service.keys revoke`` on this host (same data_dir) is refused at once:
# the command touches REVOKED_MARKER, which every cache checks (one stat per request); revoked
# from anywhere else (another replica's filesystem), at most this long afterwards. Unknown keys
# are never cached.
KEY_CACHE_TTL_S = 5.0
REVOKED_MARKER = "api-keys-revoked"


def mark_keys_revoked(data_dir: Path) -> None:
    """Tell the API processes sharing ``data_dir`` to drop their cached keys."""
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = data_dir / REVOKED_MARKER
    marker.touch()
    os.utime(marker)  # a new mtime even if the file existed


class _KeyCache:
    """Principals of recently seen valid keys, by key hash, per process."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._revoked_at = 0  # mtime of the data dir's REVOKED_MARKER when last checked
        self._lock = threading.Lock()

    def get(self, key_hash: str, marker: Path | None = None) -> Principal | None:
        if marker is not None:
            try:
                revoked_at = marker.stat().st_mtime_ns
            except OSError:
                revoked_at = 0
            if revoked_at != self._revoked_at:
                with self._lock:
                    self._entries, self._revoked_at = {}, revoked_at
                return None
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key_hash: str, principal: Principal) -> None:
        with self._lock:
            if len(self._entries) > 10_000:  # bounded: drop the expired ones, else all
                now = time.monotonic()
                live = {h: e for h, e in self._entries.items() if e[0] >= now}
                self._entries = live if len(live) <= 10_000 else {}
            self._entries[key_hash] = (time.monotonic() + self.ttl_s, principal)

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._entries = {h: e for h, e in self._entries.items() if e[1].key_id != key_id}


_key_cache = _KeyCache(KEY_CACHE_TTL_S)


def _principal_for_key(request: Request, key: str) -> Principal | None:
    with request.app.state.sessionmaker() as session:
        row = lookup_key(session, key)
    if row is None:
        return None
    return Principal(tenant=row.tenant, role=row.role, key_id=row.id)


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """Who is calling: from the bearer key, or the local mode's implicit admin.

    A coroutine: on the common path (a cached key, or the keyless local mode) it does no I/O,
    and a sync dependency would cost a thread-pool round trip on every request."""
    settings = request.app.state.settings
    if credentials is not None:
        key = credentials.credentials
        key_hash = hash_key(key) if key.startswith(KEY_PREFIX) and len(key) <= 200 else None
        marker = settings.data_dir / REVOKED_MARKER
        principal_or_none = _key_cache.get(key_hash, marker) if key_hash else None
        if principal_or_none is None:
            principal_or_none = await run_in_threadpool(_principal_for_key, request, key)
            if principal_or_none is not None and key_hash is not None:
                _key_cache.put(key_hash, principal_or_none)
        if principal_or_none is None:
            raise APIError(401, "unauthorized", "invalid or revoked API key", UNAUTHORIZED)
        principal = principal_or_none
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
