"""SQLAlchemy tables of the job store: ``jobs``, their ``job_events`` and ``job_attempts``,
the hashed ``api_keys`` that map callers to tenants, ``batches`` (grids of jobs),
``schedules`` and their ``schedule_runs`` (one per cron slot), and webhook
``webhook_endpoints`` with their ``webhook_deliveries`` and ``webhook_attempts``.

The database is the source of truth for a job's state; the broker only carries job ids.
"""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
EVENT_TYPES = ("stage", "progress", "warning", "metric", "log", "status")
# How an attempt ended: the job's final status, or requeued after its worker was lost.
ATTEMPT_OUTCOMES = ("running", "succeeded", "failed", "cancelled", "worker_lost", "timeout")
ROLES = ("admin", "member")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no time zone support, so values are stored as naive UTC there and given
    their zone back on the way out; PostgreSQL stores ``timestamptz``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY.
EventId = BigInteger().with_variant(Integer(), "sqlite")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(32))
    # The validated spec with every default filled in, so the worker runs exactly what
    # the API accepted even if a default changes between deploys.
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_unit: Mapped[str] = mapped_column(String(32), default="")
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    artifacts: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    # The grid this job belongs to (POST /jobs/batch), and the schedule slot that created it.
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="SET NULL"))
    schedule_id: Mapped[str | None] = mapped_column(ForeignKey("schedules.id", ondelete="SET NULL"))
    # Number of the job's last event. Incremented with an UPDATE on the job row, which
    # locks the row, so concurrent writers (API and worker) get distinct, ordered numbers.
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The running attempt's lease: renewed by the worker's heartbeat; once it has passed, the
    # reaper re-queues the job (or fails it with worker_lost on its last attempt).
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The running attempt must end by then (job_time_limit_s), else it fails with timeout.
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When the task message was last sent, and how often: a queued job nobody claims is
    # re-sent (its message may have been lost with the broker); the CAS claim makes that safe.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    dispatch_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    tenant: Mapped[str] = mapped_column(String(64), default="default", server_default="default")
    # Idempotency-Key of the submission and a hash of what was submitted with it.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    attempt_rows: Mapped[list[JobAttempt]] = relationship(
        lazy="selectin", order_by="JobAttempt.attempt", viewonly=True
    )

    __table_args__ = (
        # Newest-first listing and its cursor, optionally filtered by status or kind.
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_kind_created_at", "kind", "created_at"),
        Index("ix_jobs_parent_id", "parent_id"),
        Index("ix_jobs_tenant_created_at", "tenant", "created_at"),
        # A tenant's queued and running jobs: counted at every admission (its limit).
        Index("ix_jobs_tenant_status", "tenant", "status"),
        Index("ix_jobs_batch_id", "batch_id"),
        Index("ix_jobs_schedule_id", "schedule_id"),
        # NULL keys are distinct on both backends: only keyed submissions are deduplicated.
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )


class JobRow(SimpleNamespace):
    """A job read without the ORM (``job_reads.read_job``, for a response): the ``jobs`` columns
    as attributes, and ``attempt_rows`` (each with the ``job_attempts`` columns)."""


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    time: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)

    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_id_seq"),)


class JobAttempt(Base):
    """One run of a job by one worker: claimed, then ended (final status or worker lost)."""

    __tablename__ = "job_attempts"

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    outcome: Mapped[str] = mapped_column(String(32), default="running")
    error_code: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (UniqueConstraint("job_id", "attempt", name="uq_job_attempts_job_id_attempt"),)


class ApiKey(Base):
    """An API key, stored as its sha256 only; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_api_keys_tenant", "tenant"),)


class Batch(Base):
    """A grid of jobs submitted together (``POST /jobs/batch``): the base spec and the axes
    as submitted; the jobs point back with ``jobs.batch_id``."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    job_count: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        Index("ix_batches_tenant_created_at", "tenant", "created_at"),
        UniqueConstraint("tenant", "idempotency_key", name="uq_batches_tenant_idempotency_key"),
    )


class Schedule(Base):
    """A cron expression and a job template; every slot creates at most one job, enforced by
    the unique (schedule_id, slot_at) of ``schedule_runs``, whichever scheduler gets there."""

    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(255))
    cron: Mapped[str] = mapped_column(String(255))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    kind: Mapped[str] = mapped_column(String(32))
    template: Mapped[dict[str, Any]] = mapped_column(JSONType)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # The next slot not yet handled; a scheduler advances it after creating that slot's run.
    next_run_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        Index("ix_schedules_tenant_created_at", "tenant", "created_at"),
        Index("ix_schedules_enabled_next_run_at", "enabled", "next_run_at"),
    )


class ScheduleRun(Base):
    """One cron slot of a schedule: the job it created, or why it created none."""

    __tablename__ = "schedule_runs"

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    schedule_id: Mapped[str] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"))
    slot_at: Mapped[datetime] = mapped_column(UTCDateTime())
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    outcome: Mapped[str] = mapped_column(String(32), default="created")
    message: Mapped[str | None] = mapped_column(Text)
    scheduler: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        UniqueConstraint("schedule_id", "slot_at", name="uq_schedule_runs_schedule_id_slot_at"),
    )


class WebhookEndpoint(Base):
    """A tenant's callback URL, notified of its jobs' state changes."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    # Standard Webhooks signing secret, ``whsec_`` + base64.
    secret: Mapped[str] = mapped_column(String(255))
    # Event types to send (e.g. ["job.succeeded", "job.failed"]); null = all.
    event_types: Mapped[list[str] | None] = mapped_column(JSONType)
    description: Mapped[str | None] = mapped_column(String(255))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (Index("ix_webhook_endpoints_tenant", "tenant"),)


class WebhookDelivery(Base):
    """One message to one URL (the outbox): written in the transaction of the state change,
    sent and retried with backoff by a dispatcher, every try logged in ``webhook_attempts``."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the webhook-id, msg_...
    tenant: Mapped[str] = mapped_column(String(64))
    endpoint_id: Mapped[str | None] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="SET NULL")
    )
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # pending -> succeeded | failed (gave up); in flight while claimed_until is in the future.
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_job_id", "job_id"),
        Index("ix_webhook_deliveries_tenant_created_at", "tenant", "created_at"),
    )


class WebhookAttempt(Base):
    """One HTTP try of a delivery: when, the response code or the error, how long it took."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    attempt: Mapped[int] = mapped_column(Integer)
    time: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        UniqueConstraint("delivery_id", "attempt", name="uq_webhook_attempts_delivery_id_attempt"),
    )


class WebhookSigningSecret(Base):
    """A tenant's signing secret for per-job callback URLs (``spec.webhook``), which have no
    endpoint row of their own: created on first use, shown once by
    ``POST /webhooks/signing-secret`` (which also rotates it)."""

    __tablename__ = "webhook_signing_secrets"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
