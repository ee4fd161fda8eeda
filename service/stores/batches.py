"""The batches table: a grid's row (created in the transaction of its jobs, refused when
its Idempotency-Key is taken), found by id, by Idempotency-Key, or listed newest first."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.batches import BatchRequest
from service.models import Batch, utcnow


class DuplicateBatchKey(Exception):
    """Another batch of the tenant was created with the same Idempotency-Key."""


def find_by_idempotency_key(session: Session, tenant: str, key: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.tenant == tenant, Batch.idempotency_key == key))


def get_batch(session: Session, batch_id: str, tenant: str | None = None) -> Batch | None:
    """The batch, or None when unknown or (with ``tenant``) owned by another tenant."""
    batch = session.get(Batch, batch_id)
    if batch is None or (tenant is not None and batch.tenant != tenant):
        return None
    return batch


def list_batches(session: Session, tenant: str | None, limit: int) -> list[Batch]:
    """Newest first: the tenant's, or every tenant's with ``tenant`` None."""
    query = select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
    if tenant is not None:
        query = query.where(Batch.tenant == tenant)
    return list(session.scalars(query))


def create_batch(
    session: Session,
    request: BatchRequest,
    *,
    tenant: str,
    job_count: int,
    idempotency_key: str | None,
    request_hash: str,
) -> Batch:
    """Insert the batch row, flushed in the caller's transaction (its jobs follow). Raises
    ``DuplicateBatchKey``, with the transaction rolled back, when the key is taken."""
    batch = Batch(
        id=uuid.uuid4().hex,
        tenant=tenant,
        name=request.name,
        kind=request.kind,
        request={},
        job_count=job_count,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        created_at=utcnow(),
    )
    session.add(batch)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise DuplicateBatchKey(idempotency_key) from exc
    return batch
