"""The outbox: delivery rows written in the same transaction as each job status change."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from service.jsonsafe import json_safe
from service.models import (
    Job,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from service.statements import Statement
from shortened.config import get_settings

from .signing import new_delivery_id

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

FINAL_EVENT_TYPES = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
}
# Largest result summary carried in a delivery.
MAX_SUMMARY_BYTES = 4096


def event_type_for(data: dict[str, Any] | None) -> str | None:
    """The webhook event of a status event's data, or None (e.g. a cancel request, which
    changes no state: the job.cancelled that follows it does)."""
    status = (data or {}).get("status")
    if status == "queued":
        return "job.requeued" if (data or {}).get("reason") else "job.queued"
    if status == "running":
        return "job.running"
    return FINAL_EVENT_TYPES.get(str(status)) if status else None


def result_summary(result: Any) -> dict[str, Any] | None:
    """The result's scalar fields and short lists of scalars (removed blocks, ...): small
    enough for a notification; the whole result is at ``links.job``."""
    if not isinstance(result, dict):
        return None
    scalar = (str, int, float, bool, type(None))
    summary: dict[str, Any] = {}
    lists: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, scalar) and not (isinstance(value, str) and len(value) > 200):
            summary[str(key)] = value
        elif isinstance(value, list) and len(value) <= 64:
            if all(isinstance(v, scalar) and not isinstance(v, str) for v in value):
                lists[str(key)] = value
    for key, value in lists.items():
        if len(json.dumps(json_safe({**summary, key: value}))) <= MAX_SUMMARY_BYTES:
            summary[key] = value
    return json_safe(summary)


def job_links(job_id: str, base_url: str | None = None) -> dict[str, str]:
    base = (base_url or "").rstrip("/")
    return {
        "job": f"{base}/jobs/{job_id}",
        "events": f"{base}/jobs/{job_id}/events",
        "artifacts": f"{base}/jobs/{job_id}/artifacts",
        "report": f"{base}/jobs/{job_id}/report",
        "webhooks": f"{base}/jobs/{job_id}/webhooks",
    }


def _wants(event_types: Iterable[str] | None, event_type: str) -> bool:
    return not event_types or event_type in event_types


# A tenant's enabled endpoints (id, url, event_types), oldest first: every status change of
# every job reads them (an admission too, in the flight of its inserts), so a Statement.
ENDPOINTS = Statement(
    select(WebhookEndpoint.id, WebhookEndpoint.url, WebhookEndpoint.event_types)
    .where(WebhookEndpoint.tenant == bindparam("tenant"), WebhookEndpoint.enabled.is_(True))
    .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
)


def enqueue_status_change(
    session: Session,
    job_id: str,
    seq: int,
    data: dict[str, Any] | None,
    now: datetime | None = None,
    *,
    links_base_url: str | None = None,
    job: Job | None = None,
    endpoints: Sequence[tuple[Any, ...]] | None = None,
) -> list[str]:
    """Add the deliveries of a job's status change to the session (the caller commits, with
    the change itself) and return their ids. Called by ``events.append_event`` (and by
    ``job_admission.create_job`` with the new ``job`` itself, which saves reading it back,
    and the tenant's ``endpoints`` (:data:`ENDPOINTS`), read in the same flight as its
    inserts)."""
    event_type = event_type_for(data)
    if event_type is None:
        return []
    if job is None:
        job = session.execute(  # type: ignore[assignment]  # a Row with the same attributes
            select(
                Job.id,
                Job.kind,
                Job.status,
                Job.stage,
                Job.tenant,
                Job.parent_id,
                Job.batch_id,
                Job.error_code,
                Job.error_message,
                Job.result,
                Job.spec,
                Job.attempts,
            ).where(Job.id == job_id)
        ).one_or_none()
    if job is None:
        return []
    targets: list[tuple[str | None, str]] = [
        (endpoint_id, url)
        for endpoint_id, url, event_types in (
            endpoints if endpoints is not None else ENDPOINTS.run(session, {"tenant": job.tenant})
        )
        if _wants(event_types, event_type)
    ]
    hook = job.spec.get("webhook") if isinstance(job.spec, dict) else None
    if isinstance(hook, dict) and isinstance(hook.get("url"), str):
        if _wants(hook.get("event_types"), event_type):
            targets.append((None, hook["url"]))
    if not targets:
        return []
    now = now or utcnow()
    if links_base_url is None:
        links_base_url = get_settings().webhook_links_base_url
    error = (
        {"code": job.error_code, "message": (job.error_message or "")[:1000]}
        if job.error_code
        else None
    )
    payload = json_safe(
        {
            "type": event_type,
            "timestamp": now.isoformat(),
            "data": {
                "id": job.id,
                "kind": job.kind,
                "status": job.status,
                "stage": job.stage,
                "tenant": job.tenant,
                "parent_id": job.parent_id,
                "batch_id": job.batch_id,
                "attempt": job.attempts,
                "event_seq": seq,
                "error": error,
                "result": result_summary(job.result) if job.status == "succeeded" else None,
                "links": job_links(job.id, links_base_url),
            },
        }
    )
    # The job row is locked by append_event's UPDATE until commit, so the job's deliveries
    # are created one transaction after the other: number them strictly after the last one
    # even if this host's clock is behind the one that wrote it.
    last = session.scalar(
        select(func.max(WebhookDelivery.created_at)).where(WebhookDelivery.job_id == job_id)
    )
    created_at = now if last is None or now > last else last + timedelta(microseconds=1)
    ids = []
    for endpoint_id, url in targets:
        delivery_id = new_delivery_id()
        session.add(
            WebhookDelivery(
                id=delivery_id,
                tenant=job.tenant,
                endpoint_id=endpoint_id,
                job_id=job.id,
                url=url,
                event_type=event_type,
                payload=payload,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=created_at,
            )
        )
        ids.append(delivery_id)
    return ids


def is_job_callback(session: Session, delivery: WebhookDelivery) -> bool:
    """Whether a delivery without an endpoint is its job's own callback (signed with the
    tenant's signing secret), not a message of an endpoint deleted since."""
    if delivery.endpoint_id is not None or delivery.job_id is None:
        return False
    spec = session.scalar(select(Job.spec).where(Job.id == delivery.job_id))
    hook = spec.get("webhook") if isinstance(spec, dict) else None
    return isinstance(hook, dict) and hook.get("url") == delivery.url
