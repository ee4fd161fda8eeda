"""Batch routes: submit a grid of jobs in one request, read their comparison table.

``POST /jobs/batch`` is admitted by ``service.submission.submit_batch``: every combination
validated, then the batch and all of its jobs created in one transaction (all or nothing,
counted against the tenant's concurrency limit as a whole), then their messages sent.
``GET /batches/{id}`` summarises them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from service import batches as batch_store
from service import submission
from service.api.admission import (
    SUBMIT_RESPONSES,
    IdempotencyKey,
    checked_idempotency_key,
    refusals_as_http,
    replayed,
)
from service.api.deps import SessionDep, get_celery
from service.auth import Principal, PrincipalDep, get_principal
from service.batches import BatchRequest, render_table, summarize
from service.errors import coded
from service.models import Batch

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
    batch = batch_store.get_batch(session, batch_id, principal.scope)
    if batch is None:
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
    with refusals_as_http():
        submitted = submission.submit_batch(
            session,
            request.app.state.settings,
            get_celery(request),
            request.state.principal,
            body,
            checked_idempotency_key(request),
        )
    if submitted.replayed:
        replayed(response, f"/batches/{submitted.batch.id}")
    else:
        response.headers["Location"] = f"/batches/{submitted.batch.id}"
    return _out(submitted.batch)


@router.get("/batches", response_model=list[BatchOut])
def list_batches(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[BatchOut]:
    """The caller's batches, newest first."""
    return [_out(b) for b in batch_store.list_batches(session, principal.scope, limit)]


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
