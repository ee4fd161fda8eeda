"""Reads and writes of webhook endpoints and the delivery log for the API routes.

Every read takes a ``tenant`` scope: None means every tenant's (an admin), otherwise a row of
another tenant is treated exactly like an unknown id.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.orm import Session

from service.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from service.stores.paging import newest_first
from service.webhooks.signing import new_endpoint_id, new_secret


def _in_scope(row: Any, tenant: str | None) -> Any:
    return None if row is None or (tenant is not None and row.tenant != tenant) else row


# ---------------------------------------------------------------------------- endpoints


def create_endpoint(
    session: Session,
    *,
    tenant: str,
    url: str,
    event_types: list[str] | None,
    description: str | None,
) -> WebhookEndpoint:
    """Register an endpoint with a fresh signing secret, committed."""
    row = WebhookEndpoint(
        id=new_endpoint_id(),
        tenant=tenant,
        url=url,
        secret=new_secret(),
        event_types=event_types,
        description=description,
        enabled=True,
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    return row


def get_endpoint(session: Session, endpoint_id: str, tenant: str | None) -> WebhookEndpoint | None:
    row = session.get(WebhookEndpoint, endpoint_id, populate_existing=True)
    return _in_scope(row, tenant)  # type: ignore[no-any-return]


def list_endpoints(session: Session, tenant: str | None) -> list[WebhookEndpoint]:
    """Oldest first."""
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    if tenant is not None:
        query = query.where(WebhookEndpoint.tenant == tenant)
    return list(session.scalars(query))


def delete_endpoint(session: Session, endpoint: WebhookEndpoint) -> None:
    """Remove the endpoint, committed: its messages not yet delivered are marked failed, its
    delivery log stays (``endpoint_id`` set null by the foreign key)."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == "pending")
        .values(status="failed", claimed_until=None, last_error="the endpoint was deleted")
        .execution_options(synchronize_session=False)
    )
    session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id))
    session.commit()


# ---------------------------------------------------------------------------- deliveries


def get_delivery(
    session: Session, delivery_id: str, tenant: str | None, *, fresh: bool = False
) -> WebhookDelivery | None:
    row = session.get(WebhookDelivery, delivery_id, populate_existing=fresh)
    return _in_scope(row, tenant)  # type: ignore[no-any-return]


def list_deliveries(
    session: Session,
    tenant: str | None,
    *,
    job_id: str | None = None,
    status: str | None = None,
    endpoint_id: str | None = None,
    limit: int = 50,
    after: str | None = None,
) -> tuple[list[WebhookDelivery], str | None]:
    """Newest first, one page at a time (``paging.newest_first``; raises ``InvalidCursor``)."""
    d = WebhookDelivery
    query = select(d)
    if tenant is not None:
        query = query.where(d.tenant == tenant)
    if job_id is not None:
        query = query.where(d.job_id == job_id)
    if status is not None:
        query = query.where(d.status == status)
    if endpoint_id is not None:
        query = query.where(d.endpoint_id == endpoint_id)
    return newest_first(session, query, d, limit=limit, after=after)


def job_deliveries(session: Session, job_id: str) -> list[WebhookDelivery]:
    """A job's messages in the order they were created."""
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        )
    )


def attempts_of(
    session: Session, deliveries: list[WebhookDelivery]
) -> dict[str, list[WebhookAttempt]]:
    """Every try of each delivery, oldest first, in one query."""
    by_delivery: dict[str, list[WebhookAttempt]] = {row.id: [] for row in deliveries}
    if deliveries:
        for attempt in session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(list(by_delivery)))
            .order_by(WebhookAttempt.delivery_id, WebhookAttempt.attempt)
        ):
            by_delivery[attempt.delivery_id].append(attempt)
    return by_delivery


def requeue_failed(session: Session, delivery_id: str) -> bool:
    """A failed delivery back to pending with a fresh round of retries, committed; False when
    it is not failed (a compare-and-set: a dispatcher may be changing it meanwhile)."""
    requeued = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "failed")
        .values(
            status="pending",
            attempts=0,
            next_attempt_at=utcnow(),
            claimed_until=None,
            delivered_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return isinstance(requeued, CursorResult) and bool(requeued.rowcount)
