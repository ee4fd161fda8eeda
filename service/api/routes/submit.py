"""Submit routes: ``POST /jobs/<kind>`` for every row of the job-kind table.

Each route is generated from its row (``shortened.kinds``): the kind's spec class is the
request body (so each keeps its own OpenAPI schema and examples), the row's summary its
description. They all parse, call ``service.submission`` (admission, limit,
``Idempotency-Key``, dispatch) and map its refusals to HTTP answers; ``dry_run=true`` plans
the job instead of creating it.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.api.admission import (
    SUBMIT_RESPONSES,
    DryRun,
    IdempotencyKey,
    checked_idempotency_key,
    refusals_as_http,
    replayed,
)
from service.api.deps import get_celery, model_response
from service.auth import Principal, get_principal
from service.errors import coded
from service.schemas import JobOut
from service.submission import plan_submission, submit_job
from shortened.kinds import JOB_KINDS, JobKind

DRY_RUN_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Replay of an Idempotency-Key (a job), or with dry_run=true the plan: "
        '{"dry_run": true, "kind", "plan"} (plan null when the model\'s config.json is not '
        "readable by the API: hub models, a job still running)"
    }
}


def submit(request: Request, kind: str, spec: dict[str, Any], dry_run: bool = False) -> Response:
    """Admit and queue a job of ``kind`` (or, with ``dry_run``, answer its plan)."""
    principal: Principal = request.state.principal
    state = request.app.state
    if dry_run:
        with state.sessionmaker() as session, refusals_as_http():
            plan = plan_submission(session, state.settings, principal, kind, spec)
        return JSONResponse({"dry_run": True, "kind": kind, "plan": plan})
    # Its own session rather than SessionDep: a generator dependency costs two thread-pool
    # round trips per request (enter and exit), and this is the busiest write.
    with state.sessionmaker() as session, refusals_as_http():
        submitted = submit_job(
            session,
            state.settings,
            get_celery(request),
            tenant=principal.tenant,
            kind=kind,
            spec=spec,
            principal=principal,
            idempotency_key=checked_idempotency_key(request),
        )
    response = model_response(JobOut.from_row(submitted.job), 202)
    if submitted.replayed:
        replayed(response, f"/jobs/{submitted.job.id}")
    else:
        response.headers["Location"] = f"/jobs/{submitted.job.id}"
    return response


def _route(kind: JobKind) -> Any:
    """The handler of ``POST /jobs/<kind>``, its body typed as the kind's spec class."""

    def handler(
        spec: BaseModel,
        request: Request,
        dry_run: DryRun,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        return submit(request, kind.name, spec.model_dump(mode="json"), dry_run)

    handler.__name__ = handler.__qualname__ = f"submit_{kind.name}"
    handler.__doc__ = kind.summary
    signature = inspect.signature(handler)
    parameters = [
        parameter.replace(annotation=kind.spec) if name == "spec" else parameter
        for name, parameter in signature.parameters.items()
    ]
    handler.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return handler


def submit_router() -> APIRouter:
    """One submit route per row of the job-kind table (read when the app is made, so a kind
    registered before that has its route)."""
    router = APIRouter(
        prefix="/jobs",
        tags=["jobs"],
        dependencies=[Depends(get_principal)],
        responses={401: coded("Missing, invalid or revoked API key")},
    )
    for kind in JOB_KINDS.values():
        router.add_api_route(
            f"/{kind.name}",
            _route(kind),
            methods=["POST"],
            status_code=202,
            response_model=JobOut,
            responses={**SUBMIT_RESPONSES, **DRY_RUN_RESPONSE},
        )
    return router
