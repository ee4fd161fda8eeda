"""Schedule routes: cron expressions with a job template, run by ``service.scheduler``.

Authenticated and tenant-scoped like the job routes: another tenant's schedule answers 404.
Templates are validated at creation exactly like a submission of their kind (the spec, then
the source and size policy), with 422s naming the field (``template.num_blocks``, ``cron``,
``timezone``, ``model_selector.prefix``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.orm import Session

from service import schedule_store as store
from service.api.deps import SessionDep, SettingsDep
from service.auth import Principal, PrincipalDep, get_principal
from service.errors import APIError, coded
from service.models import Schedule, ScheduleRun, utcnow
from service.policy import PolicyViolation, check_submission
from service.quotas import check_cron_interval, check_schedule_count
from service.scheduler import (
    SELECTOR_KEY,
    Scheduler,
    check_cron,
    check_timezone,
    fire_times,
    next_slot,
    spec_class,
    split_template,
)
from service.schemas import JobKind, JobStatus
from shortened.config import Settings

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
CRON_DESCRIPTION = (
    "Cron expression: 5 fields (minute hour day-of-month month day-of-week), or 6 with "
    "seconds FIRST ('*/30 * * * * *': every 30 s), or an alias (@hourly, @daily, @weekly, "
    "@monthly, @yearly), evaluated in 'timezone'."
)


class ModelSelector(BaseModel):
    """Pick the job's model when each slot fires instead of fixing it in the template."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field(
        max_length=1024,
        description="s3://bucket/prefix/, file:///dir or a directory path; its child "
        "directories holding a config.json are the candidates (upload config.json last)",
    )
    pick: Literal["newest"] = Field(
        default="newest",
        description="newest: the candidate whose newest file (S3 LastModified / mtime) is newest",
    )

    @field_validator("prefix")
    @classmethod
    def _prefix_ok(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        if "://" in value and not value.startswith(("s3://", "file://")):
            raise ValueError("must be an s3:// or file:// URI or a directory path")
        return value


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=255)
    cron: str = Field(max_length=255, description=CRON_DESCRIPTION)
    timezone: str = Field(
        default="UTC", max_length=64, description="IANA time zone of the cron expression"
    )
    kind: JobKind = "prune"
    template: dict[str, Any] = Field(
        description="The job spec of 'kind' (as for POST /jobs/{kind}; a prune spec may have "
        "retrain/eval pipeline sections). Without 'model' when 'model_selector' is given."
    )
    model_selector: ModelSelector | None = Field(
        default=None,
        description="Resolve the model at each slot: e.g. the newest model under an s3:// prefix",
    )
    enabled: bool = True

    @field_validator("cron")
    @classmethod
    def _cron_ok(cls, value: str) -> str:
        return check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _timezone_ok(cls, value: str) -> str:
        return check_timezone(value)


class SchedulePatch(BaseModel):
    """Only the fields given change. A new cron, time zone or re-enabling restarts the slots
    from now (slots missed while disabled are not run)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=255)
    cron: str | None = Field(default=None, max_length=255, description=CRON_DESCRIPTION)
    timezone: str | None = Field(default=None, max_length=64)
    kind: JobKind | None = None
    template: dict[str, Any] | None = None
    model_selector: ModelSelector | None = Field(
        default=None, description="null removes the selector (the template then needs 'model')"
    )
    enabled: bool | None = None

    @field_validator("cron")
    @classmethod
    def _cron_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _timezone_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_timezone(value)


class ScheduleRunOut(BaseModel):
    slot_at: datetime = Field(description="The cron slot (or the time of a manual trigger)")
    outcome: Literal["created", "skipped_limit", "failed"]
    message: str | None = Field(
        description="Why no job (failed, skipped_limit), the model picked, missed slots skipped"
    )
    scheduler: str | None = Field(description="Scheduler that handled the slot; 'trigger': manual")
    job_id: str | None
    job_status: JobStatus | None
    model: str | None = Field(description="The job's model (the one picked by model_selector)")
    created_at: datetime


class ScheduleOut(BaseModel):
    id: str
    tenant: str
    name: str | None
    cron: str
    timezone: str
    kind: JobKind
    template: dict[str, Any]
    model_selector: ModelSelector | None
    enabled: bool
    next_run_at: datetime = Field(description="Next slot (UTC), once enabled")
    last_run_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Schedule) -> ScheduleOut:
        template, selector = split_template(row.template)
        if selector:
            template.pop("model", None)
        return cls(
            id=row.id,
            tenant=row.tenant,
            name=row.name,
            cron=row.cron,
            timezone=row.timezone,
            kind=row.kind,  # type: ignore[arg-type]
            template=template,
            model_selector=ModelSelector.model_validate(selector) if selector else None,
            enabled=row.enabled,
            next_run_at=row.next_run_at,
            last_run_at=row.last_run_at,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class ScheduleDetail(ScheduleOut):
    next_fire_times: list[datetime] = Field(description="The next slots (UTC), if enabled")
    runs: list[ScheduleRunOut] = Field(description="The latest runs, newest first")


class SchedulePage(BaseModel):
    items: list[ScheduleOut]


# ---------------------------------------------------------------------------- helpers


def _errors(prefix: tuple[str, ...], errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "loc": [*prefix, *e["loc"]]} for e in errors]


def _validated_template(
    settings: Settings,
    session: Session,
    principal: Principal,
    kind: str,
    template: dict[str, Any],
    selector: ModelSelector | None,
) -> dict[str, Any]:
    """The template to store: the kind's spec, validated and with its defaults, plus the
    selector. With a selector the spec is validated (and policy-checked) with the prefix as
    its model, so a prefix the tenant may not read is refused now, not at 2 am."""
    spec = dict(template)
    if selector is not None:
        if "model" in spec:
            raise RequestValidationError(
                [
                    {
                        "loc": ["body", "template", "model"],
                        "msg": "give either template.model or model_selector, not both",
                        "type": "value_error",
                    }
                ]
            )
        spec["model"] = selector.prefix
    try:
        validated = spec_class(kind).model_validate(spec).model_dump(mode="json")
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_context=False)
        raise RequestValidationError(_errors(("body", "template"), details)) from exc
    try:
        check_submission(
            settings, session, principal, validated, kind, check_model=selector is None
        )
    except PolicyViolation as exc:
        errors: list[dict[str, Any]] = []
        for error in exc.errors:
            loc = tuple(error["loc"][1:])  # without "body"
            if selector is not None and loc == ("model",):
                errors.append({**error, "loc": ["body", "model_selector", "prefix"]})
            else:
                errors.append({**error, "loc": ["body", "template", *loc]})
        raise RequestValidationError(errors) from exc
    if selector is not None:
        validated[SELECTOR_KEY] = selector.model_dump(mode="json")
    return validated


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


def _runs(session: Session, schedule_id: str, limit: int) -> list[ScheduleRunOut]:
    return [_run_out(*row) for row in store.list_runs(session, schedule_id, limit)]


def _run_out(run: ScheduleRun, status: str | None, spec: dict[str, Any] | None) -> ScheduleRunOut:
    return ScheduleRunOut(
        slot_at=run.slot_at,
        outcome=run.outcome,  # type: ignore[arg-type]
        message=run.message,
        scheduler=run.scheduler,
        job_id=run.job_id,
        job_status=status,  # type: ignore[arg-type]
        model=(spec or {}).get("model") if spec else None,
        created_at=run.created_at,
    )


# ---------------------------------------------------------------------------- routes


@router.post("", status_code=201, response_model=ScheduleOut)
def create_schedule(
    body: ScheduleIn,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> ScheduleOut:
    """Create a schedule: at every slot of ``cron`` (in ``timezone``) one job of ``kind`` is
    created from ``template``, however many schedulers run. A slot more than
    ``schedule_misfire_grace_s`` late (schedulers down) is not run: only the latest missed
    slot gets a job, its run message says how many were skipped. At fire time the tenant's
    concurrency limit applies (over it: run outcome ``skipped_limit``, no job), and a template
    that cannot be resolved (no model under the selector's prefix) gives a ``failed`` run;
    the schedule goes on either way."""
    check_cron_interval(settings, principal.tenant, body.cron, body.timezone)
    check_schedule_count(settings, session, principal.tenant)
    template = _validated_template(
        settings, session, principal, body.kind, body.template, body.model_selector
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
        **out.model_dump(), next_fire_times=times, runs=_runs(session, schedule.id, runs)
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
    given = body.model_fields_set
    for name in ("cron", "timezone", "enabled", "kind"):
        if name in given and getattr(body, name) is None:
            raise RequestValidationError(
                [{"loc": ["body", name], "msg": "must not be null", "type": "value_error"}]
            )
    if body.cron is not None or body.timezone is not None:
        cron, timezone = body.cron or schedule.cron, body.timezone or schedule.timezone
        check_cron_interval(settings, principal.tenant, cron, timezone)
    current = ScheduleOut.from_row(schedule)
    if given & {"kind", "template", "model_selector"}:
        kind = body.kind or schedule.kind
        template = body.template if "template" in given else current.template
        selector = body.model_selector if "model_selector" in given else current.model_selector
        if template is None:
            raise RequestValidationError(
                [{"loc": ["body", "template"], "msg": "must not be null", "type": "value_error"}]
            )
        schedule.template = _validated_template(
            settings, session, principal, kind, template, selector
        )
        schedule.kind = kind
    if "name" in given:
        schedule.name = body.name
    restart = False
    if body.cron is not None and body.cron != schedule.cron:
        schedule.cron, restart = body.cron, True
    if body.timezone is not None and body.timezone != schedule.timezone:
        schedule.timezone, restart = body.timezone, True
    if body.enabled is not None and body.enabled != schedule.enabled:
        schedule.enabled = body.enabled
        restart = restart or body.enabled
    now = utcnow()
    if restart:
        schedule.next_run_at = next_slot(schedule.cron, schedule.timezone, now)
    schedule.updated_at = now
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
    return _run_out(*store.get_run(session, schedule_id, fired.slot_at))
