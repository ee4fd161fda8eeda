"""Where a job reports outside the service: its webhook callback and its MLflow run, and
``JobSpecBase``, the two sections every job kind's spec carries (pipeline follow-ups inherit
them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .common import StrictModel

WebhookEventType = Literal[
    "job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled", "job.requeued"
]
WEBHOOK_EVENT_TYPES: tuple[str, ...] = WebhookEventType.__args__  # type: ignore[attr-defined]


def check_webhook_url(value: str) -> str:
    """A callback URL's syntax: http(s), a host, no user:password (the spec is readable
    through the API). Whether the host may be reached is the server's call (private
    targets), checked at submission and again at every send."""
    from urllib.parse import urlsplit

    value = value.strip()
    if len(value) > 2048:
        raise ValueError("at most 2048 characters")
    if any(ord(c) < 33 or ord(c) == 127 for c in value):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials (user:password@)")
    if parts.fragment:
        raise ValueError("must not contain a #fragment")
    return value


class WebhookSpec(StrictModel):
    """A per-job callback: ``url`` is POSTed the job's state changes, signed the Standard
    Webhooks way with the tenant's signing secret (``POST /webhooks/signing-secret``)."""

    url: str = Field(description="http(s) URL notified of this job's state changes")
    event_types: list[WebhookEventType] | None = Field(
        default=None, min_length=1, description="Only these events (default: all)"
    )

    @field_validator("url")
    @classmethod
    def _url_ok(cls, value: str) -> str:
        return check_webhook_url(value)


# MLflow's own limits: experiment names up to 500 characters, registered model names 256;
# narrower here, and printable, since both show up in other teams' UIs and URLs.
MLFLOW_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.:/@+-]{0,199}$"
# A registered model name as MLflow takes it (no '/' or ':', not a path form such as '.' or
# '../x'), short enough that '<tenant>.' before it stays within the registry's 256
# characters (tenant names are at most 64).
MLFLOW_MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.@+-]{0,189}$"


class MlflowTrackingSpec(StrictModel):
    """Where this job's MLflow run goes. The worker calls the tracking server, so a URI of
    the spec's own is accepted only when the server allows it (``SHORTENED_MLFLOW_*``):
    a tenant never points the worker at an arbitrary host."""

    tracking_uri: str | None = Field(
        default=None,
        description="http(s) URL of the MLflow tracking server (default: the server's "
        "SHORTENED_MLFLOW_TRACKING_URI); must be one the server allows",
    )
    experiment: str = Field(
        pattern=MLFLOW_NAME_PATTERN, description="MLflow experiment name (created if missing)"
    )
    register_as: str | None = Field(
        default=None,
        pattern=MLFLOW_MODEL_NAME_PATTERN,
        description="prune/retrain: register the output model under this registered-model name "
        "(as `<tenant>.<register_as>` unless the server shares one registry for all tenants)",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _uri_ok(cls, value: str | None) -> str | None:
        # The same syntax rules as a webhook URL: http(s), a host, no credentials.
        return None if value is None else check_webhook_url(value).rstrip("/")


class TrackingSpec(StrictModel):
    """Experiment trackers this job reports to (pipeline follow-ups inherit it)."""

    mlflow: MlflowTrackingSpec | None = None


class JobSpecBase(StrictModel):
    """What every job kind's spec has."""

    webhook: WebhookSpec | None = Field(
        default=None,
        description="Callback URL for this job's state changes (pipeline follow-ups inherit it)",
    )
    tracking: TrackingSpec | None = Field(
        default=None,
        description="Log this job as an MLflow run (pipeline follow-ups inherit it)",
    )
