"""Batch routes: submit a grid of jobs in one request, read their comparison table.

``POST /jobs/batch`` is admitted by ``service.submission.submit_batch``: every combination
validated, then the batch and all of its jobs created in one transaction (all or nothing,
counted against the tenant's concurrency limit as a whole), then their messages sent.
``GET /batches/{id}`` summarises them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from service import submission
from service.api.admission import (
    SUBMIT_RESPONSES,
    DryRun,
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
from service.schemas.batches import BatchOut, BatchSummary
from service.stores import batches as batch_store

router = APIRouter(
    tags=["batches"],
    dependencies=[Depends(get_principal)],
    responses={401: coded("Missing, invalid or revoked API key")},
)

BatchId = Annotated[str, Path(max_length=64, description="Batch id")]


def _batch_or_404(session: Any, batch_id: str, principal: Principal) -> Batch:
    batch = batch_store.get_batch(session, batch_id, principal.scope)
    if batch is None:
        raise HTTPException(404, detail=f"batch {batch_id} not found")
    return batch


@router.post(
    "/jobs/batch",
    status_code=202,
    response_model=BatchOut,
    responses={
        **SUBMIT_RESPONSES,
        200: {"description": "Replay of an Idempotency-Key, or with dry_run=true the plans"},
    },
)
def submit_batch(
    body: BatchRequest,
    request: Request,
    response: Response,
    session: SessionDep,
    dry_run: DryRun,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Queue one job per combination of the grid's axes, under one batch id. With
    ``dry_run=true``: every combination admitted and planned, nothing created (200,
    ``{"dry_run": true, "kind", "plans": [{"values", "plan"}]}``)."""
    if dry_run:
        with refusals_as_http():
            plans = submission.plan_batch(
                session, request.app.state.settings, request.state.principal, body
            )
        return JSONResponse({"dry_run": True, "kind": body.kind, "plans": plans})
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
    return BatchOut.from_row(submitted.batch)


@router.get("/batches", response_model=list[BatchOut])
def list_batches(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[BatchOut]:
    """The caller's batches, newest first."""
    return [BatchOut.from_row(b) for b in batch_store.list_batches(session, principal.scope, limit)]


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
