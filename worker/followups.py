"""A pipeline's next step: admitted through ``service.submission`` (like every job) when the
step before it succeeds. What the next step is, is the job-kind table's rule
(``shortened.kinds.next_step``, through ``service.pipeline``)."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from service.stores import events as event_store
from service.stores import job_reads
from service.submission import submit_job
from shortened.config import Settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


def queue_followups(
    sessions: sessionmaker[Session],
    job_id: str,
    settings: Settings,
    celery: Celery | None = None,
) -> list[str]:
    """Admit a pipeline's next job(s) now that ``job_id`` has succeeded (through
    ``service.submission``, like every job). Each is created at most once (an idempotency
    key per step: a redelivered message creates nothing new); one that cannot be created is
    recorded as a warning, never failing the finished job. A broker outage leaves it queued
    for the reaper to send, as everywhere. Returns the ids created now."""
    from service.pipeline import followup_specs

    created: list[str] = []
    try:
        with sessions() as session:
            job = job_reads.get_job(session, job_id)
            if job is None:
                return created
            tenant = job.tenant
            steps = followup_specs(session, job)
        for kind, spec in steps:
            with sessions() as session:
                submitted = submit_job(
                    session,
                    settings,
                    celery or _default_app(),
                    tenant=tenant,
                    kind=kind,
                    spec=spec,
                    idempotency_key=f"pipeline:{job_id}:{kind}",
                    # It continues admitted work, in the place of the step that just ended.
                    check_limit=False,
                    parent_id=job_id,
                )
                if submitted.replayed:
                    continue  # already created (a redelivered message)
                child = submitted.job
                event_store.append_event(
                    session,
                    job_id,
                    "log",
                    f"pipeline: queued {kind} job {child.id}",
                    {"child_id": child.id, "kind": kind},
                )
                session.commit()
                created.append(child.id)
    except Exception as exc:
        log.exception("job %s: could not create its pipeline's next step", job_id)
        with contextlib.suppress(Exception), sessions() as session:
            event_store.append_event(
                session, job_id, "warning", f"pipeline: next step not created: {exc}", None
            )
            session.commit()
    return created


def _default_app() -> Celery:
    from worker.celery_app import app

    return app
