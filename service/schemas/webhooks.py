"""Request and response models of the webhook routes: endpoints (their secret shown once,
when created), the tenant's signing secret, and deliveries with every try."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from shortened.specs import WebhookEventType, check_webhook_url

DeliveryStatus = Literal["pending", "succeeded", "failed"]


class WebhookEndpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="http(s) URL notified of the tenant's job state changes")
    event_types: list[WebhookEventType] | None = Field(
        default=None, min_length=1, description="Only these events (default: all)"
    )
    description: str | None = Field(default=None, max_length=255)

    @field_validator("url")
    @classmethod
    def _url_ok(cls, value: str) -> str:
        return check_webhook_url(value)


class WebhookEndpointOut(BaseModel):
    id: str
    tenant: str
    url: str
    event_types: list[str] | None
    description: str | None
    enabled: bool
    created_at: datetime

    @classmethod
    def from_row(cls, row: WebhookEndpoint) -> WebhookEndpointOut:
        return cls(
            id=row.id,
            tenant=row.tenant,
            url=row.url,
            event_types=row.event_types,
            description=row.description,
            enabled=row.enabled,
            created_at=row.created_at,
        )


class WebhookEndpointCreated(WebhookEndpointOut):
    secret: str = Field(
        description="Signing secret (whsec_...), shown this once: verify each message with it"
    )


class SigningSecretOut(BaseModel):
    tenant: str
    secret: str = Field(description="whsec_..., shown this once")
    created_at: datetime


class WebhookAttemptOut(BaseModel):
    attempt: int = Field(description="1, 2, ... across manual retries too")
    time: datetime
    status_code: int | None = Field(description="HTTP status, None when no response")
    error: str | None
    duration_ms: float | None


class WebhookDeliveryOut(BaseModel):
    id: str = Field(description="The message's webhook-id (the same on every try)")
    tenant: str
    endpoint_id: str | None = Field(description="None: the job's own callback (spec.webhook)")
    job_id: str | None
    url: str
    event_type: str
    status: DeliveryStatus
    attempts: int = Field(description="Tries in the current round (reset by a manual retry)")
    next_attempt_at: datetime | None = Field(description="When a pending one is tried next")
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any]
    attempt_log: list[WebhookAttemptOut] = Field(description="Every try, oldest first")

    @classmethod
    def from_row(cls, row: WebhookDelivery, attempts: list[WebhookAttempt]) -> WebhookDeliveryOut:
        return cls(
            id=row.id,
            tenant=row.tenant,
            endpoint_id=row.endpoint_id,
            job_id=row.job_id,
            url=row.url,
            event_type=row.event_type,
            status=row.status,  # type: ignore[arg-type]
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            created_at=row.created_at,
            delivered_at=row.delivered_at,
            payload=row.payload,
            attempt_log=[
                WebhookAttemptOut(
                    attempt=a.attempt,
                    time=a.time,
                    status_code=a.status_code,
                    error=a.error,
                    duration_ms=a.duration_ms,
                )
                for a in attempts
            ],
        )


class DeliveryPage(BaseModel):
    items: list[WebhookDeliveryOut]
    next_cursor: str | None = Field(description="Pass as ?after= to get the next (older) page")
