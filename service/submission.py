"""Admission: the one way a job comes into existence, whoever asks for it.

``POST /jobs/*`` and ``POST /jobs/batch`` (a tenant), a schedule's slot or manual trigger
(the scheduler) and a pipeline's next step (the worker, when a step succeeds) all go
through here, in this order:

1. idempotency: a key the tenant already used returns that job (or batch) instead of a new
   one, and the same key with a different request is refused (:class:`IdempotencyConflict`);
2. policy and admission (``service.policy``, ``shortened.admission``): sources and sizes,
   then whether the job can run at all (the model's config and layer count against the
   target, the data files), for requests a tenant wrote (a schedule's template was checked
   when it was saved, a follow-up's spec is part of its root's);
3. the job rows, each with its first ``queued`` event (``job_admission.create_job``);
4. the concurrency limit, counted over every job being added under the tenant lock, and the
   commit (:func:`commit_admitted`; :class:`LimitExceeded`, and the rows are rolled back);
   a pipeline's next step is exempt, since it continues work admitted already and takes
   the place of the step that just finished;
5. dispatch: the task message, carrying only the job id, sent to the broker.

Broker failure is handled the same way on every path: the job row is committed *before* the
message is sent, and if sending fails the job stays ``queued``; it is marked for the reaper's
next round (``job_recovery.dispatch_failed``) with a warning event, and the reaper re-sends
its message once the broker answers again. The caller gets its job (202) as if the broker had
been up. This beats failing the job: nothing already accepted is lost (a schedule's slot, a
pipeline's next step after an hour of pruning, a batch half sent), a retry with the same
``Idempotency-Key`` returns the same job instead of a duplicate, and a message that did reach
the broker before the error was raised cannot run a job that was reported failed. It is the
path the reaper already takes for any message lost with a broker restart, so one mechanism
covers both; a duplicate message is harmless (the worker claims only queued jobs).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session

from service import batches
from service.models import Batch, Job
from service.policy import PolicyViolation, SourcePolicy, check_submission
from service.queue import send_run_job
from service.stores import batches as batch_store
from service.stores import job_admission, job_recovery
from service.tracing import annotate_job
from shortened.config import Settings

if TYPE_CHECKING:
    from celery import Celery

    from service.auth import Principal
    from service.batches import BatchRequest

log = logging.getLogger(__name__)

RowT = TypeVar("RowT", Job, Batch)

DISPATCH_DEFERRED = (
    "the broker is unavailable: the job stays queued and its message is sent when the broker "
    "is back"
)


class LimitExceeded(Exception):
    """The tenant's queued and running jobs plus the ones being added exceed its limit."""

    def __init__(self, tenant: str, active: int, adding: int, limit: int, batch: bool) -> None:
        self.tenant, self.active, self.adding, self.limit = tenant, active, adding, limit
        self.batch = batch
        adds = f"; this batch adds {adding}" if batch else ""
        super().__init__(
            f"tenant {tenant!r} has {active} queued or running jobs{adds} (limit {limit})"
        )


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different request."""

    def __init__(self, what: str, existing_id: str) -> None:
        self.existing_id = existing_id
        super().__init__(
            f"this Idempotency-Key was used for {what} {existing_id} with a different request"
        )


@dataclass(frozen=True)
class Submitted:
    job: Job
    replayed: bool = False  # an earlier request with the same Idempotency-Key made it
    unsent: bool = False  # the broker was down: the reaper sends the message later


@dataclass(frozen=True)
class SubmittedBatch:
    batch: Batch
    replayed: bool = False
    unsent: list[str] = field(default_factory=list)


def request_hash(payload: Any) -> str:
    """A fingerprint of a request, independent of key order: what an Idempotency-Key binds."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------- the steps


def commit_admitted(
    session: Session,
    settings: Settings,
    tenant: str,
    adding: int = 1,
    *,
    batch: bool = False,
    check_limit: bool = True,
) -> None:
    """Commit the ``adding`` jobs (of one ``batch``) this transaction has inserted; with
    ``check_limit``, only if the tenant's queued and running jobs, these included, stay
    within its concurrency limit, else raise ``LimitExceeded`` with the rows rolled back.

    The count runs under the tenant lock, held from the count to the commit and not during
    the inserts, which is what lets one tenant's submissions proceed in parallel. It is
    exact: a transaction counts only once it holds the lock, so it sees every job admitted
    before it (committed) and none of those still waiting (uncommitted), which count
    themselves in turn (``job_admission.commit_within_limit``)."""
    limit = settings.limits_for(tenant).max_concurrent_jobs if check_limit else None
    if limit is None:
        session.commit()
        return
    try:
        job_admission.commit_within_limit(session, tenant, limit)
    except job_admission.OverLimit:
        session.rollback()
        # The committed ones: for the message.
        active = job_admission.count_active_jobs(session, tenant)
        raise LimitExceeded(tenant, active, adding, limit, batch) from None


def reserve(session: Session, settings: Settings, tenant: str, adding: int = 1) -> None:
    """Before inserting ``adding`` jobs: take the tenant lock (held until the caller's
    transaction ends) and check that they fit within the tenant's concurrency limit; raises
    ``LimitExceeded``, after which the caller may go on without the jobs (the scheduler
    records a skipped slot in the same transaction)."""
    limit = settings.limits_for(tenant).max_concurrent_jobs
    if limit is None:
        return
    if job_admission.over_limit_locked(session, tenant, limit, adding):
        active = job_admission.count_active_jobs(session, tenant)
        raise LimitExceeded(tenant, active, adding, limit, False)


def admit(
    session: Session,
    settings: Settings,
    *,
    tenant: str,
    kind: str,
    spec: dict[str, Any],
    principal: Principal | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    parent_id: str | None = None,
    schedule_id: str | None = None,
) -> Job:
    """Policy (with ``principal``), then the job row with its first event, in the caller's
    transaction: the caller commits (:func:`commit_admitted`, which checks the limit), then
    calls :func:`dispatch`. Raises ``PolicyViolation`` or
    ``job_admission.DuplicateIdempotencyKey`` (the transaction is rolled back then)."""
    if principal is not None:
        check_submission(settings, session, principal, spec, kind)
    job = job_admission.create_job(
        session,
        kind,
        spec,
        parent_id=parent_id,
        tenant=tenant,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        schedule_id=schedule_id,
        commit=False,
    )
    return job


def plan_submission(
    session: Session, settings: Settings, principal: Principal, kind: str, spec: dict[str, Any]
) -> dict[str, Any] | None:
    """A dry run: the same policy and admission as :func:`admit` (``PolicyViolation``,
    including ``insufficient_memory``), then the job's plan instead of a job (None when the
    model's config is not readable by the API: a hub model, a job still running)."""
    check_submission(settings, session, principal, spec, kind)
    return SourcePolicy(settings, session, principal).plan(kind, spec)


def plan_batch(
    session: Session, settings: Settings, principal: Principal, body: BatchRequest
) -> list[dict[str, Any]]:
    """A batch's dry run: every combination admitted as :func:`submit_batch` admits it, and
    its plan (``{"values", "plan"}`` per combination, in grid order); nothing is created."""
    planned = []
    for values, spec in batches.expand(body, settings.max_batch_jobs):
        try:
            plan = plan_submission(session, settings, principal, body.kind, spec)
        except PolicyViolation as exc:
            where = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise PolicyViolation(
                [{**e, "msg": f"combination {where}: {e['msg']}"} for e in exc.errors]
            ) from exc
        planned.append({"values": values, "plan": plan})
    session.rollback()
    return planned


def dispatch(
    session: Session, celery: Celery, job_ids: Sequence[str], *, first: bool = True
) -> list[str]:
    """Send the task message of each (committed, queued) job; return the ids not sent.

    A job whose message could not be sent stays queued and is marked for the reaper's next
    round; on its ``first`` dispatch it also gets a warning event saying so (the reaper's
    own retries add none)."""
    unsent: list[str] = []
    for job_id in job_ids:
        try:
            annotate_job(job_id)
            send_run_job(celery, job_id)
        except Exception as exc:
            unsent.append(job_id)
            log.warning("could not send job %s: %s (the reaper will re-send it)", job_id, exc)
            try:
                job_recovery.dispatch_failed(session, job_id, DISPATCH_DEFERRED if first else None)
            except Exception:  # the reaper still finds it, after its usual wait
                session.rollback()
                log.exception("could not mark job %s for re-sending", job_id)
    return unsent


# ---------------------------------------------------------------------------- whole paths


def _same_request(existing: RowT | None, hash_: str, what: str) -> RowT:
    """The job or batch an earlier request made with this Idempotency-Key, if the request
    is the same; raises ``IdempotencyConflict`` otherwise."""
    assert existing is not None  # found by its key, which only a committed row holds
    if existing.request_hash != hash_:
        raise IdempotencyConflict(what, existing.id)
    return existing


def submit_job(
    session: Session,
    settings: Settings,
    celery: Celery,
    *,
    tenant: str,
    kind: str,
    spec: dict[str, Any],
    principal: Principal | None = None,
    idempotency_key: str | None = None,
    check_limit: bool = True,
    parent_id: str | None = None,
) -> Submitted:
    """Admit one job, commit it, send its message: ``POST /jobs/*`` (with the tenant's
    ``principal``, whose policy applies) and a pipeline's next step. Raises
    ``PolicyViolation``, ``LimitExceeded`` or ``IdempotencyConflict``, with the transaction
    rolled back (the tenant lock released)."""
    hash_ = request_hash({"kind": kind, "spec": spec})
    if idempotency_key is not None and (
        existing := job_admission.find_by_idempotency_key(session, tenant, idempotency_key)
    ):
        return Submitted(_same_request(existing, hash_, "job"), replayed=True)
    try:
        job = admit(
            session,
            settings,
            tenant=tenant,
            kind=kind,
            spec=spec,
            principal=principal,
            idempotency_key=idempotency_key,
            request_hash=hash_,
            parent_id=parent_id,
        )
    except job_admission.DuplicateIdempotencyKey:  # a concurrent request with the same key won
        existing = job_admission.find_by_idempotency_key(session, tenant, idempotency_key or "")
        return Submitted(_same_request(existing, hash_, "job"), replayed=True)
    except PolicyViolation:
        session.rollback()
        raise
    commit_admitted(session, settings, tenant, check_limit=check_limit)
    unsent = dispatch(session, celery, [job.id])
    return Submitted(job, unsent=bool(unsent))


def submit_batch(
    session: Session,
    settings: Settings,
    celery: Celery,
    principal: Principal,
    body: BatchRequest,
    idempotency_key: str | None = None,
) -> SubmittedBatch:
    """Admit a grid as a whole: every combination passes the policy and all of them fit
    under the limit, or none is created. Raises ``batches.GridError``, ``PolicyViolation``
    (each message naming its combination), ``LimitExceeded`` or ``IdempotencyConflict``."""
    tenant = principal.tenant
    hash_ = request_hash(body.model_dump(mode="json"))
    if idempotency_key is not None and (
        existing := batch_store.find_by_idempotency_key(session, tenant, idempotency_key)
    ):
        return SubmittedBatch(_same_request(existing, hash_, "batch"), replayed=True)
    points = batches.expand(body, settings.max_batch_jobs)
    try:
        for values, spec in points:
            try:
                check_submission(settings, session, principal, spec, body.kind)
            except PolicyViolation as exc:
                where = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise PolicyViolation(
                    [{**e, "msg": f"combination {where}: {e['msg']}"} for e in exc.errors]
                ) from exc
    except PolicyViolation:
        session.rollback()
        raise
    try:
        batch = batch_store.create_batch(
            session,
            body,
            tenant=tenant,
            job_count=len(points),
            idempotency_key=idempotency_key,
            request_hash=hash_,
        )
    except batch_store.DuplicateBatchKey:  # a concurrent request with the same key won
        existing = batch_store.find_by_idempotency_key(session, tenant, idempotency_key or "")
        return SubmittedBatch(_same_request(existing, hash_, "batch"), replayed=True)
    recorded: list[dict[str, Any]] = []
    for values, spec in points:
        job = job_admission.create_job(
            session, body.kind, spec, tenant=tenant, batch_id=batch.id, commit=False
        )
        recorded.append({"job_id": job.id, "values": values})
    batch.request = {**body.model_dump(mode="json"), "points": recorded}
    commit_admitted(session, settings, tenant, len(points), batch=True)
    unsent = dispatch(session, celery, [p["job_id"] for p in recorded])
    if unsent:
        log.warning("batch %s: %d of %d messages not sent", batch.id, len(unsent), len(recorded))
    session.refresh(batch)
    return SubmittedBatch(batch, unsent=unsent)
