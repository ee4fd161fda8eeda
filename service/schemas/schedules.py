"""Request and response models of the schedule routes: a schedule as created, patched and
read back (its template with the model selector apart), and its runs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.models import Schedule, ScheduleRun
from service.scheduler import check_cron, check_timezone, split_template
from service.schemas.jobs import JobKind, JobStatus

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

    @classmethod
    def from_row(
        cls, run: ScheduleRun, status: str | None, spec: dict[str, Any] | None
    ) -> ScheduleRunOut:
        """A run with its job's status and spec (None without a job)."""
        return cls(
            slot_at=run.slot_at,
            outcome=run.outcome,  # type: ignore[arg-type]
            message=run.message,
            scheduler=run.scheduler,
            job_id=run.job_id,
            job_status=status,  # type: ignore[arg-type]
            model=(spec or {}).get("model") if spec else None,
            created_at=run.created_at,
        )


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
