"""OpenTelemetry traces: API request -> Celery message -> task -> engine stages.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the standard variable; the OTLP exporter
reads it and the other ``OTEL_*`` variables itself). When off nothing of OpenTelemetry is
imported and every function here returns at once. ``configure`` takes a provider of its own
(tests: an in-memory exporter).

The FastAPI instrumentation makes a server span per request; the Celery instrumentation
makes a producer span where the API sends the task message, writes the trace context into
the message headers, and makes the worker's consumer span a child of it. The worker adds a
span per engine stage (worker.tasks) and the job id on all of them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

JOB_ID_ATTRIBUTE = "shortened.job_id"
JOB_KIND_ATTRIBUTE = "shortened.job_kind"
SERVICE_NAMES = {"api": "shortened-api", "worker": "shortened-worker"}

_enabled = False
_celery_instrumented = False


def enabled() -> bool:
    return _enabled


def wanted() -> bool:
    """Whether the environment asks for traces."""
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(role: str, provider: Any = None) -> bool:
    """Install ``provider`` (default: batched OTLP export to the configured endpoint) as the
    global tracer provider, and instrument Celery (both sides use it: the API publishes,
    the worker consumes). Returns whether tracing is on."""
    global _enabled, _celery_instrumented
    if provider is None:
        if not wanted():
            return False
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        name = os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAMES.get(role, role)
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    from opentelemetry import trace

    trace.set_tracer_provider(provider)
    if not _celery_instrumented:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument(tracer_provider=provider)
        _celery_instrumented = True
    _enabled = True
    return True


def instrument_app(app: FastAPI) -> None:
    """Server spans for the API's requests (when tracing is on)."""
    if not _enabled and not configure("api"):
        return
    from opentelemetry import trace
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=trace.get_tracer_provider(),
        excluded_urls="healthz,readyz,metrics",
    )


def annotate_job(job_id: str, kind: str | None = None) -> None:
    """Put the job id on the current span (the request's, the task's)."""
    if not _enabled:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    span.set_attribute(JOB_ID_ATTRIBUTE, job_id)
    if kind is not None:
        span.set_attribute(JOB_KIND_ATTRIBUTE, kind)


class StageSpans:
    """A span per engine stage, children of the span current when it was made (the Celery
    task's), ended at each stage change and at ``close``. Fed the progress reports."""

    def __init__(self, job_id: str, kind: str) -> None:
        from opentelemetry import context, trace

        self.job_id = job_id
        self.kind = kind
        self.tracer = trace.get_tracer("shortened.worker")
        self.parent = context.get_current()
        self.stage: str | None = None
        self.span: Any = None

    def __call__(self, stage: str) -> None:
        if stage == self.stage:
            return
        self.close()
        self.stage = stage
        self.span = self.tracer.start_span(
            f"stage {stage}",
            context=self.parent,
            attributes={
                JOB_ID_ATTRIBUTE: self.job_id,
                JOB_KIND_ATTRIBUTE: self.kind,
                "shortened.stage": stage,
            },
        )

    def close(self, status: str | None = None) -> None:
        if self.span is not None:
            if status is not None:
                self.span.set_attribute("shortened.job_status", status)
            self.span.end()
            self.span = None


def stage_spans(job_id: str, kind: str) -> StageSpans | None:
    return StageSpans(job_id, kind) if _enabled else None
