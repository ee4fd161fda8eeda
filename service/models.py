"""SQLAlchemy tables of the job store: ``jobs``, their ``job_events`` and ``job_attempts``,
and the hashed ``api_keys`` that map callers to tenants.

The database is the source of truth for a job's state; the broker only carries job ids.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
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
        # NULL keys are distinct on both backends: only keyed submissions are deduplicated.
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )


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
