"""The scheduler: turns cron slots of ``schedules`` into jobs, exactly one per slot, with any
number of schedulers running (a thread in each API replica and/or ``python -m
service.scheduler`` processes).

A round finds the enabled schedules whose ``next_run_at`` has passed and handles each due
slot in ONE transaction:

1. the schedule row is locked (PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so another scheduler
   handling it is skipped rather than waited for) and ``next_run_at`` is advanced with a
   compare-and-set on its old value: a scheduler that read the same slot changes no row;
2. the slot's ``schedule_runs`` row is inserted: UNIQUE (schedule_id, slot_at) is the
   backstop that makes a second run of one slot impossible whatever happens above;
3. the template is resolved (``model_selector``: the newest model directory under a prefix)
   and the job admitted by ``service.submission.admit`` like any other (the tenant lock and
   concurrency limit of ``POST /jobs``), with ``schedule_id`` and an idempotency key naming
   the slot (a third guard: UNIQUE (tenant, idempotency_key) of ``jobs``).

Only after the commit is the task message sent (``service.submission.dispatch``). If the
broker is down the job stays queued and the reaper re-sends it, as on every admission path.

Outcomes of a run: ``created`` (a job), ``skipped_limit`` (the tenant had
``max_concurrent_jobs`` queued or running), ``failed`` (the template could not be resolved at
fire time, e.g. no model under the prefix: the message says why). The schedule goes on in
every case.

Missed slots: a slot more than ``schedule_misfire_grace_s`` late (every scheduler was down)
is not run; only the latest missed slot of a schedule gets a job, and its run message counts
the slots skipped before it. Slots late by less than the grace are all run (catching up).

Cron expressions have 5 fields (minute hour day-of-month month day-of-week) or 6 with
seconds FIRST (``*/10 * * * * *``: every 10 s), or an alias (``@daily``); they are evaluated
in the schedule's IANA time zone by croniter on aware datetimes (a slot in a DST gap fires at
the first valid time after it), and ``next_run_at`` is stored in UTC.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError

from service.locks import is_postgres
from service.loop import BackgroundLoop
from service.models import Schedule, ScheduleRun, utcnow
from service.stores.job_admission import DuplicateIdempotencyKey
from service.submission import LimitExceeded, admit, dispatch, reserve
from shortened.config import Settings
from shortened.kinds import parse_spec
from shortened.redact import redact

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

RUN_OUTCOMES = ("created", "skipped_limit", "failed")
# Key of the model selector inside a stored template (templates are specs, whose models
# forbid unknown keys, so it cannot clash with a spec field).
SELECTOR_KEY = "model_selector"
TRIGGER = "trigger"  # ScheduleRun.scheduler of runs started by POST /schedules/{id}/trigger
# Counting missed slots one by one stops here (a per-second schedule down for days).
MAX_COUNTED_MISSES = 100_000


# ---------------------------------------------------------------------------- cron


def _has_seconds(expr: str) -> bool:
    return len(expr.split()) == 6


def check_cron(expr: str) -> str:
    """The expression, normalised; ValueError naming the problem."""
    expr = " ".join(expr.split())
    if not expr:
        raise ValueError("must not be empty")
    if not expr.startswith("@") and len(expr.split()) not in (5, 6):
        raise ValueError(
            "expected 5 fields (minute hour day-of-month month day-of-week) or 6 with "
            "seconds first, or an alias such as @daily"
        )
    if not croniter.is_valid(expr, second_at_beginning=_has_seconds(expr)):
        raise ValueError(f"invalid cron expression {expr!r}")
    try:
        next_slot(expr, "UTC", utcnow())
    except ValueError as exc:  # CroniterBadDateError: e.g. February 30th
        raise ValueError(f"cron expression {expr!r} never fires") from exc
    return expr


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown IANA time zone {name!r} (e.g. UTC, Europe/Paris)") from exc
    return name


def _iter(expr: str, tz: str, start: datetime) -> croniter:
    local = start.astimezone(ZoneInfo(tz))
    return croniter(expr, local, second_at_beginning=_has_seconds(expr))


def _utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


def next_slot(expr: str, tz: str, after: datetime) -> datetime:
    """The first slot strictly after ``after``, in UTC."""
    return _utc(_iter(expr, tz, after).get_next(datetime))


def fire_times(expr: str, tz: str, first: datetime, count: int) -> list[datetime]:
    """``first`` (a slot) and the ``count - 1`` slots after it, in UTC."""
    times = [_utc(first)]
    it = _iter(expr, tz, first)
    while len(times) < count:
        times.append(_utc(it.get_next(datetime)))
    return times


def latest_slot(expr: str, tz: str, due: datetime, now: datetime) -> tuple[datetime, int]:
    """The latest slot at or before ``now`` starting from the due slot ``due``, and how many
    slots that skips (``MAX_COUNTED_MISSES`` at most: beyond, the count is a lower bound)."""
    it = _iter(expr, tz, due)
    slot, skipped = due, 0
    while True:
        following = _utc(it.get_next(datetime))
        if following > now:
            return slot, skipped
        slot, skipped = following, skipped + 1
        if skipped >= MAX_COUNTED_MISSES:
            prev = _utc(_iter(expr, tz, now).get_prev(datetime))
            return max(prev, slot), skipped


# ---------------------------------------------------------------------------- templates


class TemplateError(Exception):
    """The template cannot become a job now (no model under the prefix, policy, ...)."""


def split_template(template: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the stored spec, the model selector or None)."""
    spec = dict(template)
    selector = spec.pop(SELECTOR_KEY, None)
    return spec, selector


def resolve_template(
    settings: Settings, session: Session, schedule: Schedule
) -> tuple[dict[str, Any], str | None]:
    """The concrete job spec of a schedule's template now, and the model it picked (with a
    selector). Raises TemplateError."""
    from pydantic import ValidationError

    from service.auth import Principal
    from service.policy import SourcePolicy
    from shortened.storage import newest_model_dir

    spec, selector = split_template(schedule.template)
    picked = None
    if selector:
        prefix = selector["prefix"]
        try:
            picked = newest_model_dir(
                prefix,
                s3_endpoint_url=settings.s3_endpoint_url or None,
                s3_region=settings.s3_region,
            ).uri
        except Exception as exc:  # nothing there, store unreachable, bad credentials
            raise TemplateError(f"model_selector: {exc}") from exc
        problem = SourcePolicy(
            settings, session, Principal(tenant=schedule.tenant, role="member")
        ).check_source(picked)
        if problem is not None:
            raise TemplateError(f"model {picked}: {problem}")
        spec["model"] = picked
    try:
        validated = parse_spec(schedule.kind, spec)
    except ValidationError as exc:  # the spec schema changed since the schedule was created
        raise TemplateError(f"template no longer valid: {exc}") from exc
    return validated.model_dump(mode="json"), picked


# ---------------------------------------------------------------------------- firing


@dataclass(frozen=True)
class Fired:
    schedule_id: str
    slot_at: datetime
    outcome: str
    job_id: str | None
    message: str


@dataclass
class TickReport:
    fired: list[Fired] = field(default_factory=list)
    lost: int = 0  # slots another scheduler handled first
    send_errors: int = 0

    @property
    def created(self) -> list[str]:
        return [f.job_id for f in self.fired if f.job_id]


def default_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _rowcount(result: Any) -> int:
    return int(result.rowcount) if isinstance(result, CursorResult) else 0


class SlotTaken(Exception):
    """Another scheduler created this slot's run first."""


class Scheduler(BackgroundLoop):
    loop_name = "scheduler"

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        celery: Celery,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.sessions = sessions
        self.celery = celery
        self.name = name or default_name()
        # Touched after every successful round: a liveness probe checks its age.
        self.heartbeat_file: Path | None = None

    # -- one slot ---------------------------------------------------------------------

    def _create_run(
        self, session: Session, schedule: Schedule, slot_at: datetime, note: str, by: str
    ) -> Fired:
        """Insert the slot's run and (if it can) its job, in the caller's transaction.
        Raises SlotTaken when the slot already has a run."""
        run = ScheduleRun(
            schedule_id=schedule.id,
            slot_at=slot_at,
            outcome="failed",
            scheduler=by,
            created_at=utcnow(),
        )
        session.add(run)
        try:
            session.flush()  # UNIQUE (schedule_id, slot_at): the slot is ours from here
        except IntegrityError as exc:
            raise SlotTaken from exc
        notes = [note] if note else []
        job_id = None
        try:
            spec, picked = resolve_template(self.settings, session, schedule)
        except TemplateError as exc:
            log.warning("schedule %s slot %s: %s", schedule.id, slot_at.isoformat(), exc)
            outcome, notes = "failed", [*notes, redact(str(exc))]
        else:
            if picked:
                notes.append(f"model {picked}")
            try:
                # The limit before the job's rows: a slot over the limit is recorded as
                # skipped in this same transaction, without them.
                reserve(session, self.settings, schedule.tenant)
                job = admit(
                    session,
                    self.settings,
                    tenant=schedule.tenant,
                    kind=schedule.kind,
                    spec=spec,
                    idempotency_key=f"schedule:{schedule.id}:{slot_at.isoformat()}",
                    schedule_id=schedule.id,
                )
            except LimitExceeded as exc:
                outcome = "skipped_limit"
                notes.append(str(exc))
            except DuplicateIdempotencyKey as exc:  # rolled back already
                raise SlotTaken from exc
            else:
                outcome, job_id = "created", job.id
        run.outcome = outcome
        run.job_id = job_id
        run.message = "; ".join(notes) or None
        session.flush()
        return Fired(schedule.id, slot_at, outcome, job_id, run.message or "")

    def _send(self, job_id: str, report: TickReport | None = None) -> None:
        with self.sessions() as session:
            unsent = dispatch(session, self.celery, [job_id])
        if report is not None:
            report.send_errors += len(unsent)

    def fire_due_slot(self, schedule_id: str, report: TickReport) -> Fired | None:
        """Handle the schedule's due slot, if it still has one and nobody else is on it."""
        with self.sessions() as session:
            now = utcnow()
            query = select(Schedule).where(
                Schedule.id == schedule_id,
                Schedule.enabled.is_(True),
                Schedule.next_run_at <= now,
            )
            if is_postgres(session):
                query = query.with_for_update(skip_locked=True)
            schedule = session.scalars(query.execution_options(populate_existing=True)).first()
            if schedule is None:  # not due any more, disabled, deleted, or locked by another
                session.rollback()
                return None
            due = schedule.next_run_at
            note = ""
            if (now - due).total_seconds() <= self.settings.schedule_misfire_grace_s:
                slot = due
            else:
                slot, skipped = latest_slot(schedule.cron, schedule.timezone, due, now)
                if skipped:
                    note = (
                        f"{skipped}{'+' if skipped >= MAX_COUNTED_MISSES else ''} missed slot(s) "
                        f"skipped, from {due.isoformat()}"
                    )
                    log.warning("schedule %s: %s", schedule.id, note)
            following = next_slot(schedule.cron, schedule.timezone, slot)
            claimed = session.execute(
                update(Schedule)
                .where(
                    Schedule.id == schedule.id,
                    Schedule.next_run_at == due,
                    Schedule.enabled.is_(True),
                )
                .values(next_run_at=following, last_run_at=slot, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if not _rowcount(claimed):
                session.rollback()
                report.lost += 1
                return None
            try:
                fired = self._create_run(session, schedule, slot, note, self.name)
                session.commit()
            except (SlotTaken, IntegrityError):
                session.rollback()
                report.lost += 1
                return None
        log.info(
            "schedule %s slot %s: %s%s",
            fired.schedule_id,
            fired.slot_at.isoformat(),
            fired.outcome,
            f" job {fired.job_id}" if fired.job_id else f" ({fired.message})",
        )
        report.fired.append(fired)
        if fired.job_id:
            self._send(fired.job_id, report)
        return fired

    def trigger(self, schedule_id: str, tenant: str | None = None) -> Fired | None:
        """Run the schedule now, outside its cron slots (``POST /schedules/{id}/trigger``):
        a run with ``slot_at`` = now, whatever ``enabled`` says. None for an unknown id (or,
        with ``tenant``, another tenant's schedule)."""
        with self.sessions() as session:
            query = select(Schedule).where(Schedule.id == schedule_id)
            if tenant is not None:
                query = query.where(Schedule.tenant == tenant)
            if is_postgres(session):
                query = query.with_for_update()
            schedule = session.scalars(query.execution_options(populate_existing=True)).first()
            if schedule is None:
                session.rollback()
                return None
            fired = self._create_run(session, schedule, utcnow(), "triggered", TRIGGER)
            session.commit()
        if fired.job_id:
            self._send(fired.job_id)
        return fired

    # -- rounds -------------------------------------------------------------------------

    def run_once(self, *, max_slots: int = 100) -> TickReport:
        """One round: every due slot of every due schedule (at most ``max_slots``)."""
        report = TickReport()
        with self.sessions() as session:
            due = list(
                session.scalars(
                    select(Schedule.id)
                    .where(Schedule.enabled.is_(True), Schedule.next_run_at <= utcnow())
                    .order_by(Schedule.next_run_at)
                    .limit(max_slots)
                )
            )
        handled = 0
        for schedule_id in due:
            # Catch up on the slots late by less than the grace, one transaction each.
            while handled < max_slots and self.fire_due_slot(schedule_id, report) is not None:
                handled += 1
        return report

    def after_round(self, report: Any) -> bool:
        if self.heartbeat_file is not None:
            self.heartbeat_file.touch()
        return False

    def wait_s(self, interval_s: float) -> float:
        # Jitter: replicas started together do not poll in lock-step.
        return interval_s * random.uniform(0.5, 1.5)


if __name__ == "__main__":  # the same as ``shortened scheduler``
    from shortened.cli.service_commands import start_service_command

    start_service_command("scheduler")
