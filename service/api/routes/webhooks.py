"""Webhook routes: register callback URLs, the tenant's signing secret for per-job
callbacks, and the delivery log (every message and every try).

Authenticated and tenant-scoped like the job routes: another tenant's endpoint, delivery or
job answers 404, exactly like an unknown id; an admin sees every tenant's. A secret is shown
once only, when it is created (endpoint) or rotated (signing secret).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from service.api.deps import SessionDep
from service.auth import Principal, PrincipalDep, get_principal
from service.errors import coded
from service.models import WebhookDelivery, WebhookEndpoint
from service.quotas import check_webhook_endpoint_count
from service.schemas.webhooks import (
    DeliveryPage,
    DeliveryStatus,
    SigningSecretOut,
    WebhookDeliveryOut,
    WebhookEndpointCreated,
    WebhookEndpointIn,
    WebhookEndpointOut,
)
from service.stores import job_reads
from service.stores import webhooks as store
from service.stores.paging import InvalidCursor
from service.webhooks import is_job_callback, rotate_signing_secret, target_error

router = APIRouter(
    tags=["webhooks"],
    dependencies=[Depends(get_principal)],
    responses={
        400: {"description": "The body is not JSON"},
        401: coded("Missing, invalid or revoked API key"),
    },
)

Id = Annotated[str, Path(max_length=64)]


# ---------------------------------------------------------------------------- helpers


def _url_error(message: str, value: str) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ("body", "url"), "msg": message, "type": "value_error", "input": value}]
    )


def _endpoint_or_404(session: Session, endpoint_id: str, principal: Principal) -> WebhookEndpoint:
    row = store.get_endpoint(session, endpoint_id, principal.scope)
    if row is None:
        raise HTTPException(404, detail=f"webhook endpoint {endpoint_id} not found")
    return row


def _with_attempts(session: Session, rows: list[WebhookDelivery]) -> list[WebhookDeliveryOut]:
    attempts = store.attempts_of(session, rows)
    return [WebhookDeliveryOut.from_row(row, attempts[row.id]) for row in rows]


# ---------------------------------------------------------------------------- endpoints


@router.post(
    "/webhooks",
    status_code=201,
    response_model=WebhookEndpointCreated,
    responses={422: {"description": "Bad or disallowed URL (private targets), bad event type"}},
)
def create_endpoint(
    body: WebhookEndpointIn,
    request: Request,
    response: Response,
    session: SessionDep,
    principal: PrincipalDep,
) -> WebhookEndpointCreated:
    """Register a callback URL for the caller's tenant; the response holds its signing
    secret, shown this once."""
    settings = request.app.state.settings
    if (
        message := target_error(body.url, settings.resolved_webhook_allow_private_targets)
    ) is not None:
        raise _url_error(message, body.url)
    check_webhook_endpoint_count(settings, session, principal.tenant)
    row = store.create_endpoint(
        session,
        tenant=principal.tenant,
        url=body.url,
        event_types=list(body.event_types) if body.event_types else None,
        description=body.description,
    )
    response.headers["Location"] = f"/webhooks/{row.id}"
    return WebhookEndpointCreated(
        **WebhookEndpointOut.from_row(row).model_dump(), secret=row.secret
    )


@router.get("/webhooks", response_model=list[WebhookEndpointOut])
def list_endpoints(session: SessionDep, principal: PrincipalDep) -> list[WebhookEndpointOut]:
    """The tenant's endpoints, oldest first (an admin's: every tenant's). No secrets."""
    return [
        WebhookEndpointOut.from_row(row) for row in store.list_endpoints(session, principal.scope)
    ]


@router.post("/webhooks/signing-secret", status_code=201, response_model=SigningSecretOut)
def rotate_secret(session: SessionDep, principal: PrincipalDep) -> SigningSecretOut:
    """Create or rotate the tenant's signing secret for per-job callbacks (``spec.webhook``)
    and show it, this once. Messages sent from now on, retries included, are signed with it."""
    row = rotate_signing_secret(session, principal.tenant)
    return SigningSecretOut(tenant=row.tenant, secret=row.secret, created_at=row.created_at)


@router.get("/webhooks/deliveries", response_model=DeliveryPage)
def list_deliveries(
    session: SessionDep,
    principal: PrincipalDep,
    job_id: Annotated[str | None, Query(max_length=64)] = None,
    status: DeliveryStatus | None = None,
    endpoint_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> DeliveryPage:
    """Messages, newest first, each with every try: the tenant's (an admin's: all)."""
    try:
        rows, next_cursor = store.list_deliveries(
            session,
            principal.scope,
            job_id=job_id,
            status=status,
            endpoint_id=endpoint_id,
            limit=limit,
            after=after,
        )
    except InvalidCursor as exc:
        raise HTTPException(
            422, detail=[{"loc": ["query", "after"], "msg": str(exc), "type": "value_error"}]
        ) from exc
    return DeliveryPage(items=_with_attempts(session, rows), next_cursor=next_cursor)


@router.post(
    "/webhooks/deliveries/{delivery_id}/retry",
    response_model=WebhookDeliveryOut,
    status_code=202,
    responses={404: {"description": "No such delivery"}, 409: {"description": "Not failed"}},
)
def retry_delivery(
    delivery_id: Id, session: SessionDep, principal: PrincipalDep
) -> WebhookDeliveryOut:
    """Send a failed message again (same webhook-id), with a fresh round of retries."""
    row = store.get_delivery(session, delivery_id, principal.scope)
    if row is None:
        raise HTTPException(404, detail=f"delivery {delivery_id} not found")
    if row.endpoint_id is None and not is_job_callback(session, row):
        raise HTTPException(409, detail=f"delivery {delivery_id}: its endpoint was deleted")
    if not store.requeue_failed(session, delivery_id):
        raise HTTPException(
            409, detail=f"delivery {delivery_id} is {row.status}; only failed ones are retried"
        )
    row = store.get_delivery(session, delivery_id, None, fresh=True)
    assert row is not None
    return _with_attempts(session, [row])[0]


@router.get(
    "/webhooks/{endpoint_id}",
    response_model=WebhookEndpointOut,
    responses={404: {"description": "No such endpoint"}},
)
def get_endpoint(
    endpoint_id: Id, session: SessionDep, principal: PrincipalDep
) -> WebhookEndpointOut:
    return WebhookEndpointOut.from_row(_endpoint_or_404(session, endpoint_id, principal))


@router.delete(
    "/webhooks/{endpoint_id}",
    status_code=204,
    responses={404: {"description": "No such endpoint"}},
)
def delete_endpoint(endpoint_id: Id, session: SessionDep, principal: PrincipalDep) -> Response:
    """Remove an endpoint. Its messages not yet delivered are marked failed; its delivery
    log stays (with ``endpoint_id`` null)."""
    store.delete_endpoint(session, _endpoint_or_404(session, endpoint_id, principal))
    return Response(status_code=204)


@router.get(
    "/jobs/{job_id}/webhooks",
    response_model=list[WebhookDeliveryOut],
    responses={404: {"description": "No job with this id"}},
)
def job_deliveries(
    job_id: Id, session: SessionDep, principal: PrincipalDep
) -> list[WebhookDeliveryOut]:
    """The job's messages in the order they were created (the job's own order), each
    with every try."""
    if job_reads.get_job(session, job_id, principal.scope) is None:
        raise HTTPException(404, detail=f"job {job_id} not found")
    return _with_attempts(session, store.job_deliveries(session, job_id))
