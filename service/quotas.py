"""Per-tenant quotas on what a tenant keeps: how many schedules and webhook endpoints, and
how often its schedules may fire (the write rate is service.ratelimit's).

Every limit is a setting with per-tenant overrides (``Settings.limits_for``). Count quotas
answer 429 with a code naming the limit; a cron firing too often is a 422 on ``cron``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi.exceptions import RequestValidationError
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from service.errors import APIError
from service.models import Schedule, WebhookEndpoint, utcnow
from service.scheduler import fire_times, next_slot
from shortened.config import Settings

# Consecutive slots compared for a cron's shortest interval: a cron's pattern repeats every
# minute/hour/day, so its shortest gap shows within the first slots.
CRON_SAMPLE_SLOTS = 240


def _lock_quota(session: Session, tenant: str, what: str) -> None:
    """Serialise a tenant's creations of ``what`` until commit, so two concurrent requests
    cannot both take the last place (PostgreSQL; SQLite serialises writers anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"{what}:{tenant}"}
        )


def _check_count(
    settings: Settings,
    session: Session,
    tenant: str,
    model: type[Schedule] | type[WebhookEndpoint],
    name: str,
    what: str,
) -> None:
    _lock_quota(session, tenant, name)
    limit = getattr(settings.limits_for(tenant), name)
    count = session.scalar(select(func.count()).select_from(model).where(model.tenant == tenant))
    if count is not None and count >= limit:
        session.rollback()
        raise APIError(
            429,
            f"too_many_{what.replace(' ', '_')}",
            f"tenant {tenant!r} has {count} {what} (limit {name}={limit}); delete one first",
        )


def check_schedule_count(settings: Settings, session: Session, tenant: str) -> None:
    """429 ``too_many_schedules`` when ``tenant`` is at ``max_schedules``."""
    _check_count(settings, session, tenant, Schedule, "max_schedules", "schedules")


def check_webhook_endpoint_count(settings: Settings, session: Session, tenant: str) -> None:
    """429 ``too_many_webhook_endpoints`` when ``tenant`` is at ``max_webhook_endpoints``."""
    _check_count(
        settings, session, tenant, WebhookEndpoint, "max_webhook_endpoints", "webhook endpoints"
    )


def shortest_interval_s(cron: str, timezone: str, start: datetime | None = None) -> float:
    """The shortest time between consecutive slots of ``cron``, seconds."""
    first = next_slot(cron, timezone, start or utcnow())
    times = fire_times(cron, timezone, first, CRON_SAMPLE_SLOTS)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return min(gaps, default=timedelta.max).total_seconds()


def check_cron_interval(settings: Settings, tenant: str, cron: str, timezone: str) -> None:
    """422 on ``cron`` when its slots come closer than the tenant's ``min_cron_interval_s``."""
    minimum = settings.limits_for(tenant).min_cron_interval_s
    assert minimum is not None
    # Without a seconds field slots are whole minutes apart: nothing to compute up to 60 s.
    if minimum <= 60 and len(cron.split()) != 6:
        return
    interval = shortest_interval_s(cron, timezone)
    if interval < minimum:
        raise RequestValidationError(
            [
                {
                    "loc": ["body", "cron"],
                    "msg": f"fires every {interval:g} s; the shortest interval allowed is "
                    f"{minimum:g} s (min_cron_interval_s)",
                    "type": "value_error",
                }
            ]
        )
