"""Prometheus metrics of the API, served on ``GET /metrics``.

* HTTP traffic (``RequestMetrics``, a pure ASGI middleware): ``http_requests_total`` and
  the ``http_request_duration_seconds`` histogram, labelled by ``method``, ``handler`` (the
  route template, e.g. ``/jobs/{job_id}``: bounded cardinality; unknown paths are ``none``)
  and ``status`` (the exact code), the names and labels prometheus-fastapi-instrumentator
  uses. The template is the route the router itself matched (``scope["route"]``), so a
  request is not matched against every route a second time.
* The job store and the queue, read when Prometheus scrapes (``JobStoreCollector``):
  ``shortened_jobs{status,kind}`` (one GROUP BY query) and ``shortened_queue_depth{queue}``,
  the messages waiting in the Celery queue (Redis: the queue's lists; the embedded filesystem
  broker: its message files), plus ``shortened_metrics_source_up{source}`` (0 when the
  database or broker could not be read for this scrape).

Each app has its own registry (tests build many apps in one process). With
``PROMETHEUS_MULTIPROC_DIR`` set (uvicorn ``--workers N``) the HTTP metrics of all worker
processes are merged; the job store metrics are read once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from service.models import JOB_STATUSES, Job
from shortened.kinds import kind_names

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

    from shortened.config import Settings

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# Request latencies: health probes take milliseconds, artifact downloads minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BROKER_TIMEOUT_S = 3.0


class JobStoreCollector(Collector):
    """Jobs by status and kind, and the broker queue's depth, evaluated at scrape time."""

    def __init__(self, sessions: sessionmaker[Session], celery: Celery, settings: Settings) -> None:
        self.sessions = sessions
        self.celery = celery
        self.settings = settings

    def describe(self) -> Iterable[Metric]:
        return []  # nothing is read at registration; the families are known from collect()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "shortened_metrics_source_up",
            "Whether the source of the job/queue metrics answered this scrape",
            labels=["source"],
        )
        try:
            counts = self.job_counts()
        except Exception as exc:
            log.warning("metrics: could not count jobs: %s", exc)
            up.add_metric(["database"], 0)
        else:
            up.add_metric(["database"], 1)
            jobs = GaugeMetricFamily(
                "shortened_jobs",
                "Jobs in the job store by status and kind",
                labels=["status", "kind"],
            )
            kinds = sorted(set(kind_names()) | {kind for _, kind in counts})
            statuses = list(JOB_STATUSES) + sorted({s for s, _ in counts} - set(JOB_STATUSES))
            for status in statuses:  # every combination, zeros included: no vanishing series
                for kind in kinds:
                    jobs.add_metric([status, kind], counts.get((status, kind), 0))
            yield jobs
        try:
            depth = self.queue_depth()
        except Exception as exc:
            log.warning("metrics: could not read the queue depth: %s", exc)
            up.add_metric(["broker"], 0)
        else:
            up.add_metric(["broker"], 1)
            queue = GaugeMetricFamily(
                "shortened_queue_depth",
                "Task messages waiting in the broker queue (not yet taken by a worker)",
                labels=["queue"],
            )
            queue.add_metric([self.settings.queue], depth)
            yield queue
        yield up

    def job_counts(self) -> dict[tuple[str, str], int]:
        with self.sessions() as session:
            rows = session.execute(
                select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind)
            ).all()
        return {(status, kind): count for status, kind, count in rows}

    def queue_depth(self) -> int:
        """Messages in the queue, as the broker transport counts them (kombu: Redis LLEN over
        the queue's priority lists; filesystem: the queue's message files). A queue that does
        not exist yet holds nothing."""
        from kombu.exceptions import ChannelError

        with self.celery.pool.acquire(block=True, timeout=BROKER_TIMEOUT_S) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_S
            )
            try:
                declared = connection.default_channel.queue_declare(
                    queue=self.settings.queue, passive=True
                )
            except ChannelError:
                return 0
            return int(declared.message_count)


def metrics_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class RequestMetrics:
    """Counts every HTTP request and observes its duration, by method, route template and
    status code. Pure ASGI: no request object, no second routing pass (the template is the
    route the router matched and left in the scope; none when nothing matched)."""

    def __init__(self, app: Any, registry: CollectorRegistry) -> None:
        self.app = app
        labels = ("method", "status", "handler")
        self.requests = Counter(
            "http_requests_total",
            "Total number of requests by method, status and handler.",
            labels,
            registry=registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Latency by method, status and handler.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped every handler

        async def send_and_see(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            handler = getattr(scope.get("route"), "path", None) or "none"
            if handler != METRICS_PATH:  # scrapes are not API traffic
                labels = (scope["method"], str(status), handler)
                self.requests.labels(*labels).inc()
                self.latency.labels(*labels).observe(time.perf_counter() - started)


def setup_metrics(app: FastAPI) -> None:
    """Instrument ``app``'s requests and add ``GET /metrics`` (not in the OpenAPI schema).
    Call after ``app.state`` has its sessionmaker, celery app and settings."""
    registry = metrics_registry()
    store_collector = JobStoreCollector(
        app.state.sessionmaker, app.state.celery, app.state.settings
    )
    registry.register(store_collector)
    app.add_middleware(RequestMetrics, registry=registry)
    app.state.metrics_registry = registry

    @app.get(METRICS_PATH, include_in_schema=False)
    def metrics(request: Request) -> Response:
        """Prometheus text format. Unauthenticated, like /healthz: keep it off public ingress."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client.multiprocess import MultiProcessCollector

            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            merged.register(store_collector)
            return _exposition(merged)
        return _exposition(registry)


def _exposition(registry: Any) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
