"""Schedule routes: cron expressions with a job template, run by ``service.scheduler``.

Authenticated and tenant-scoped like the job routes: another tenant's schedule answers 404.
Templates are validated at creation exactly like a submission of their kind (the spec, then
the source and size policy), with 422s naming the field (``template.num_blocks``, ``cron``,
``timezone``, ``model_selector.prefix``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from service.api.admission import DryRun
from service.api.deps import SessionDep, SettingsDep
from service.auth import Principal, PrincipalDep, get_principal
from service.errors import APIError, coded
from service.models import Schedule, utcnow
from service.quotas import check_cron_interval, check_schedule_count
from service.schedule_rules import apply_patch, template_plan, validated_template
from service.scheduler import Scheduler, fire_times, next_slot
from service.schemas.schedules import (
    ScheduleDetail,
    ScheduleIn,
    ScheduleOut,
    SchedulePage,
    SchedulePatch,
    ScheduleRunOut,
)
from service.stores import schedules as store

router = APIRouter(
    prefix="/schedules",
    tags=["schedules"],
    dependencies=[Depends(get_principal)],
    responses={
        400: {"description": "The body is not JSON"},
        401: coded("Missing, invalid or revoked API key"),
    },
)

ScheduleId = Annotated[str, Path(max_length=64, description="Schedule id")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No schedule with this id"}}


def _schedule_or_404(session: Session, schedule_id: str, principal: Principal) -> Schedule:
    schedule = store.get_schedule(session, schedule_id, principal.scope)
    if schedule is None:
        raise HTTPException(404, detail=f"schedule {schedule_id} not found")
    return schedule


def _scheduler(request: Request) -> Scheduler:
    state = request.app.state
    scheduler = getattr(state, "scheduler", None)
    if scheduler is None:
        scheduler = state.scheduler = Scheduler(state.settings, state.sessionmaker, state.celery)
    return scheduler


@router.post(
    "",
    status_code=201,
    response_model=ScheduleOut,
    responses={
        200: {
            "description": "With dry_run=true: the template admitted as at creation, its next "
            'slot and its plan: {"dry_run": true, "kind", "next_run_at", "plan"} (plan null '
            "with a model selector: the model is picked at each slot); nothing is created"
        }
    },
)
def create_schedule(
    body: ScheduleIn,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    dry_run: DryRun,
) -> Any:
    """Create a schedule: at every slot of ``cron`` (in ``timezone``) one job of ``kind`` is
    created from ``template``, however many schedulers run. A slot more than
    ``schedule_misfire_grace_s`` late (schedulers down) is not run: only the latest missed
    slot gets a job, its run message says how many were skipped. At fire time the tenant's
    concurrency limit applies (over it: run outcome ``skipped_limit``, no job), and a template
    that cannot be resolved (no model under the selector's prefix) gives a ``failed`` run;
    the schedule goes on either way."""
    check_cron_interval(settings, principal.tenant, body.cron, body.timezone)
    check_schedule_count(settings, session, principal.tenant)
    template = validated_template(
        settings, session, principal, body.kind, body.template, body.model_selector
    )
    if dry_run:
        plan = template_plan(settings, session, principal, body.kind, template, body.model_selector)
        return JSONResponse(
            {
                "dry_run": True,
                "kind": body.kind,
                "next_run_at": next_slot(body.cron, body.timezone, utcnow()).isoformat(),
                "plan": plan,
            }
        )
    schedule = store.create_schedule(
        session,
        tenant=principal.tenant,
        name=body.name,
        cron=body.cron,
        timezone=body.timezone,
        kind=body.kind,
        template=template,
        enabled=body.enabled,
        next_run_at=next_slot(body.cron, body.timezone, utcnow()),
    )
    response.headers["Location"] = f"/schedules/{schedule.id}"
    return ScheduleOut.from_row(schedule)


@router.get("", response_model=SchedulePage)
def list_schedules(
    session: SessionDep,
    principal: PrincipalDep,
    enabled: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> SchedulePage:
    """The tenant's schedules (an admin's: all), newest first."""
    rows = store.list_schedules(session, principal.scope, enabled=enabled, limit=limit)
    return SchedulePage(items=[ScheduleOut.from_row(row) for row in rows])


@router.get("/{schedule_id}", response_model=ScheduleDetail, responses=NOT_FOUND)
def get_schedule(
    schedule_id: ScheduleId,
    session: SessionDep,
    principal: PrincipalDep,
    runs: Annotated[int, Query(ge=0, le=500, description="How many recent runs")] = 20,
    upcoming: Annotated[int, Query(ge=0, le=100, description="How many next slots")] = 5,
) -> ScheduleDetail:
    """The schedule, its next slots and its latest runs with their jobs' statuses."""
    schedule = _schedule_or_404(session, schedule_id, principal)
    out = ScheduleOut.from_row(schedule)
    times = (
        fire_times(schedule.cron, schedule.timezone, schedule.next_run_at, upcoming)
        if schedule.enabled and upcoming
        else []
    )
    return ScheduleDetail(
        **out.model_dump(),
        next_fire_times=times,
        runs=[ScheduleRunOut.from_row(*row) for row in store.list_runs(session, schedule.id, runs)],
    )


@router.patch("/{schedule_id}", response_model=ScheduleOut, responses=NOT_FOUND)
def update_schedule(
    schedule_id: ScheduleId,
    body: SchedulePatch,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> ScheduleOut:
    """Change a schedule: ``enabled``, ``cron``, ``timezone``, ``name``, or the template
    (``kind``, ``template``, ``model_selector``, validated as at creation)."""
    schedule = _schedule_or_404(session, schedule_id, principal)
    apply_patch(settings, session, principal, schedule, body)
    session.commit()
    return ScheduleOut.from_row(schedule)


@router.delete("/{schedule_id}", status_code=204, responses=NOT_FOUND)
def delete_schedule(schedule_id: ScheduleId, session: SessionDep, principal: PrincipalDep) -> None:
    """Delete a schedule and its run history. No slot fires after this returns (a slot being
    handled at that moment commits first); its jobs are kept, unlinked (``schedule_id``
    null), and keep running."""
    _schedule_or_404(session, schedule_id, principal)
    store.delete_schedule(session, schedule_id)


@router.post(
    "/{schedule_id}/trigger",
    status_code=202,
    response_model=ScheduleRunOut,
    responses={
        409: coded("template_failed: the template could not be resolved now (run recorded)"),
        429: coded("too_many_jobs: the tenant is at its concurrency limit (run recorded)"),
        **NOT_FOUND,
    },
)
def trigger_schedule(
    schedule_id: ScheduleId,
    request: Request,
    response: Response,
    session: SessionDep,
    principal: PrincipalDep,
) -> ScheduleRunOut:
    """Run the schedule now, outside its cron slots (also when disabled): a run whose
    ``slot_at`` is now, and its job (202, ``Location`` of the job). The run is recorded
    also when no job is created (409, 429)."""
    _schedule_or_404(session, schedule_id, principal)
    session.rollback()  # the trigger works in its own transaction
    fired = _scheduler(request).trigger(schedule_id, principal.scope)
    if fired is None:
        raise HTTPException(404, detail=f"schedule {schedule_id} not found")
    if fired.outcome == "skipped_limit":
        raise APIError(429, "too_many_jobs", fired.message, {"Retry-After": "30"})
    if fired.outcome == "failed":
        raise APIError(409, "template_failed", fired.message)
    response.headers["Location"] = f"/jobs/{fired.job_id}"
    return ScheduleRunOut.from_row(*store.get_run(session, schedule_id, fired.slot_at))
