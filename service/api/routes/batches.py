"""Batch routes: submit a grid of jobs in one request, read their comparison table.

``POST /jobs/batch`` validates every combination, then creates the batch and all of its jobs
in one transaction (all or nothing, counted against the tenant's concurrency limit as a
whole) and sends their messages. ``GET /batches/{id}`` summarises them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service import crud
from service.api.deps import SessionDep, get_celery
from service.api.routes.jobs import SUBMIT_RESPONSES, IdempotencyKey, _idempotency_key, _lock_tenant
from service.auth import Principal, PrincipalDep, get_principal
from service.batches import BatchRequest, GridError, expand, render_table, summarize
from service.errors import APIError, coded
from service.models import Batch, utcnow
from service.policy import PolicyViolation, check_submission
from service.queue import RUN_JOB_TASK

log = logging.getLogger(__name__)

router = APIRouter(
    tags=["batches"],
    dependencies=[Depends(get_principal)],
    responses={401: coded("Missing, invalid or revoked API key")},
)

BatchId = Annotated[str, Path(max_length=64, description="Batch id")]


class BatchOut(BaseModel):
    id: str
    name: str | None
    kind: str
    job_count: int
    job_ids: list[str]
    points: list[dict[str, Any]]


class BatchSummary(BaseModel):
    id: str
    name: str | None
    kind: str
    tenant: str
    status: str
    counts: dict[str, int]
    job_count: int
    axes: list[str]
    columns: list[str]
    rows: list[dict[str, Any]]
    baseline: dict[str, Any] | None
    best_by_ppl: str | None
    ppl_median: float | None
    created_at: Any


def _out(batch: Batch) -> BatchOut:
    points = batch.request.get("points", [])
    return BatchOut(
        id=batch.id,
        name=batch.name,
        kind=batch.kind,
        job_count=batch.job_count,
        job_ids=[p["job_id"] for p in points],
        points=points,
    )


def _batch_or_404(session: Any, batch_id: str, principal: Principal) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None or (principal.scope is not None and batch.tenant != principal.scope):
        raise HTTPException(404, detail=f"batch {batch_id} not found")
    return batch


@router.post("/jobs/batch", status_code=202, response_model=BatchOut, responses=SUBMIT_RESPONSES)
def submit_batch(
    body: BatchRequest,
    request: Request,
    response: Response,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> BatchOut:
    """Queue one job per combination of the grid's axes, under one batch id."""
    principal: Principal = request.state.principal
    settings = request.app.state.settings
    key = _idempotency_key(request)
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    request_hash = hashlib.sha256(canonical.encode()).hexdigest()
    if key is not None:
        existing = session.scalar(
            select(Batch).where(Batch.tenant == principal.tenant, Batch.idempotency_key == key)
        )
        if existing is not None:
            if existing.request_hash != request_hash:
                raise RequestValidationError(
                    [
                        {
                            "loc": ("header", "Idempotency-Key"),
                            "msg": f"this Idempotency-Key was used for batch {existing.id} with a different request",
                            "type": "value_error",
                        }
                    ]
                )
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
            response.headers["Location"] = f"/batches/{existing.id}"
            return _out(existing)
    try:
        points = expand(body, settings.max_batch_jobs)
    except GridError as exc:
        raise RequestValidationError(exc.errors) from exc
    for values, spec in points:
        try:
            check_submission(settings, session, principal, spec)
        except PolicyViolation as exc:
            where = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise RequestValidationError(
                [{**e, "msg": f"combination {where}: {e['msg']}"} for e in exc.errors]
            ) from exc
    _lock_tenant(session, principal.tenant)
    limit = settings.limits_for(principal.tenant).max_concurrent_jobs or 0
    active = crud.count_active_jobs(session, principal.tenant)
    if active + len(points) > limit:
        session.rollback()
        raise APIError(
            429,
            "too_many_jobs",
            f"tenant {principal.tenant!r} has {active} queued or running jobs; this batch adds "
            f"{len(points)} (limit {limit}); retry when enough have finished or split the grid",
            {"Retry-After": "30"},
        )
    batch = Batch(
        id=crud.new_job_id(),
        tenant=principal.tenant,
        name=body.name,
        kind=body.kind,
        request={},
        job_count=len(points),
        idempotency_key=key,
        request_hash=request_hash,
        created_at=utcnow(),
    )
    session.add(batch)
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent retry with the same key won
        session.rollback()
        raise APIError(
            409, "conflict", "a batch with this Idempotency-Key is being created; retry"
        ) from exc
    recorded: list[dict[str, Any]] = []
    for values, spec in points:
        job = crud.create_job(
            session, body.kind, spec, tenant=principal.tenant, batch_id=batch.id, commit=False
        )
        recorded.append({"job_id": job.id, "values": values})
    batch.request = {**body.model_dump(mode="json"), "points": recorded}
    session.commit()
    celery = get_celery(request)
    unsent = 0
    for point in recorded:
        try:
            celery.send_task(RUN_JOB_TASK, args=[point["job_id"]])
        except Exception:  # the reaper re-sends queued jobs whose message was lost
            unsent += 1
            crud.dispatch_failed(session, point["job_id"])
    if unsent:
        log.warning(
            "batch %s: %d of %d messages not sent; the reaper retries",
            batch.id,
            unsent,
            len(recorded),
        )
    response.headers["Location"] = f"/batches/{batch.id}"
    session.refresh(batch)
    return _out(batch)


@router.get("/batches", response_model=list[BatchOut])
def list_batches(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[BatchOut]:
    """The caller's batches, newest first."""
    query = select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
    if principal.scope is not None:
        query = query.where(Batch.tenant == principal.scope)
    return [_out(b) for b in session.scalars(query)]


@router.get(
    "/batches/{batch_id}",
    response_model=BatchSummary,
    responses={
        200: {"content": {"text/markdown": {}}, "description": "JSON, or ?format=markdown"},
        404: {"description": "No batch with this id"},
    },
)
def get_batch(
    batch_id: BatchId,
    session: SessionDep,
    principal: PrincipalDep,
    format: Literal["json", "markdown"] = "json",
) -> Any:
    """Status counts and a comparison table: one row per job (its pipeline's status, the
    grid values, parameters, removed blocks, whether scores were reused, and the eval's
    perplexity, accuracy, latency and throughput when the pipeline has an eval step)."""
    summary = summarize(session, _batch_or_404(session, batch_id, principal))
    if format == "markdown":
        return PlainTextResponse(render_table(summary), media_type="text/markdown")
    return summary
