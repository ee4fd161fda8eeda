"""Reads and writes of schedules and their runs for the API routes (the scheduler, which
fires them, has its own compare-and-set queries in ``service.scheduler``).

Reads take a ``tenant`` scope: None means every tenant's (an admin), otherwise another
tenant's schedule is treated exactly like an unknown id.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.models import Job, Schedule, ScheduleRun, utcnow


def create_schedule(
    session: Session,
    *,
    tenant: str,
    name: str | None,
    cron: str,
    timezone: str,
    kind: str,
    template: dict[str, Any],
    enabled: bool,
    next_run_at: datetime,
) -> Schedule:
    """Insert a schedule, committed."""
    now = utcnow()
    schedule = Schedule(
        id=uuid.uuid4().hex,
        tenant=tenant,
        name=name,
        cron=cron,
        timezone=timezone,
        kind=kind,
        template=template,
        enabled=enabled,
        next_run_at=next_run_at,
        created_at=now,
        updated_at=now,
    )
    session.add(schedule)
    session.commit()
    return schedule


def get_schedule(session: Session, schedule_id: str, tenant: str | None) -> Schedule | None:
    schedule = session.get(Schedule, schedule_id, populate_existing=True)
    if schedule is None or (tenant is not None and schedule.tenant != tenant):
        return None
    return schedule


def list_schedules(
    session: Session, tenant: str | None, *, enabled: bool | None = None, limit: int = 100
) -> list[Schedule]:
    """Newest first."""
    query = select(Schedule)
    if tenant is not None:
        query = query.where(Schedule.tenant == tenant)
    if enabled is not None:
        query = query.where(Schedule.enabled.is_(enabled))
    query = query.order_by(Schedule.created_at.desc(), Schedule.id.desc()).limit(limit)
    return list(session.scalars(query))


def delete_schedule(session: Session, schedule_id: str) -> None:
    """Delete it and its runs, committed; its jobs stay (``schedule_id`` set null)."""
    session.execute(delete(Schedule).where(Schedule.id == schedule_id))
    session.commit()


RunRow = tuple[ScheduleRun, str | None, dict[str, Any] | None]  # the run, its job's status, spec


def list_runs(session: Session, schedule_id: str, limit: int) -> list[RunRow]:
    """The latest runs first, each with its job's status and spec (None without a job)."""
    rows = session.execute(
        select(ScheduleRun, Job.status, Job.spec)
        .outerjoin(Job, Job.id == ScheduleRun.job_id)
        .where(ScheduleRun.schedule_id == schedule_id)
        .order_by(ScheduleRun.slot_at.desc(), ScheduleRun.id.desc())
        .limit(limit)
    ).all()
    return [(run, status, spec) for run, status, spec in rows]


def get_run(session: Session, schedule_id: str, slot_at: datetime) -> RunRow:
    """The run of one slot (which must exist), with its job's status and spec."""
    run = session.scalars(
        select(ScheduleRun).where(
            ScheduleRun.schedule_id == schedule_id, ScheduleRun.slot_at == slot_at
        )
    ).one()
    job = session.get(Job, run.job_id) if run.job_id else None
    return run, job.status if job else None, job.spec if job else None
