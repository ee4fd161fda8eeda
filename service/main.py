"""The FastAPI application: ``create_app(settings)`` builds one; ``app`` uses the environment.

uvicorn service.main:app
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from anyio import to_thread
from fastapi import FastAPI

from service.api.docs import add_offline_docs
from service.api.routes import batches, health, jobs, report, schedules, submit, webhooks
from service.async_reads import AsyncReads, pool_size
from service.db import (
    is_sqlite,
    make_engine,
    make_sessionmaker,
    upgrade_database,
)
from service.errors import add_error_handlers
from service.limits import BodyLimits
from service.metrics import setup_metrics
from service.queue import make_celery
from service.ratelimit import RateLimiter
from service.reaper import Reaper
from service.scheduler import Scheduler
from service.tracing import instrument_app
from service.webhooks import WebhookDispatcher
from shortened.config import Settings, get_settings
from shortened.logs import configure_logging

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


def start_background_loops(
    settings: Settings,
    sessions: sessionmaker[Session],
    celery: Celery,
    scheduler: Scheduler | None = None,
) -> Callable[[], None]:
    """Start the reaper, the scheduler and the webhook dispatcher (each unless its interval is
    0) on threads of this process; returns the function that stops them.

    Every one of them is safe to run in several processes at once (API replicas, or the API
    processes of one host): the reaper's changes are compare-and-set (see reaper.py), the
    scheduler creates one job per cron slot (see scheduler.py) and the dispatcher's claims are
    compare-and-set (see webhooks). ``shortened serve`` with several API processes still runs
    them once, in its supervisor: N copies on one host would only add database polling."""
    reaper = Reaper(settings, sessions, celery)
    scheduler = scheduler or Scheduler(settings, sessions, celery)
    dispatcher = WebhookDispatcher(settings, sessions)
    if settings.reaper_interval_s > 0:
        reaper.start(settings.reaper_interval_s)
    if settings.scheduler_interval_s > 0:
        scheduler.start(settings.scheduler_interval_s)
    if settings.webhook_interval_s > 0:
        dispatcher.start(settings.webhook_interval_s)
    log.info("background loops (reaper, scheduler, webhook dispatcher) in process %d", os.getpid())

    def stop() -> None:
        scheduler.stop()
        dispatcher.stop()
        reaper.stop()

    return stop


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # No API keys on a non-loopback address: refuse to start rather than serve everyone.
    settings.check_auth_binding()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Embedded mode (SQLite) migrates itself; with PostgreSQL migrations are a
        # deploy step (`alembic upgrade head`), not something every API replica races to do.
        if is_sqlite(settings.resolved_database_url):
            upgrade_database(settings)
        # Sync routes run on these threads; each holds one pooled connection at most.
        to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        # Status reads on the event loop (PostgreSQL), with this loop's connections.
        app.state.reads = AsyncReads.for_engine(app.state.engine, pool_size(settings.api_threads))
        stop_loops = (
            start_background_loops(
                settings, app.state.sessionmaker, app.state.celery, app.state.scheduler
            )
            if settings.background_loops
            else None
        )
        # What start-up built (routes, schemas, the ORM's metadata, compiled statements)
        # lives as long as the process: out of the collector's generations, so that a full
        # collection no longer walks it. Those walks were the status read's p99 tail at 50
        # clients (150 -> 50-65 ms) and ~0.15 ms of its mean CPU. (No collection first: in
        # a process with a large heap already, the tests', it took seconds.)
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # collectable again (a process that runs several apps: the tests)
            if stop_loops is not None:
                stop_loops()
            if app.state.reads is not None:
                await app.state.reads.close()
                app.state.reads = None
            app.state.engine.dispose()

    app = FastAPI(
        title="shortened",
        summary="Depth pruning of LLMs (Shortened LLaMA) as a job service",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served from local assets by add_offline_docs
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = make_engine(settings.resolved_database_url, pool_size=settings.api_threads)
    app.state.sessionmaker = make_sessionmaker(app.state.engine)
    app.state.reads = None  # made by the lifespan, on the loop that uses it
    # Used only to send task messages (by name): the API never imports the tasks or torch.
    app.state.celery = make_celery(settings)
    app.state.store = None  # opened on first use, see deps.get_store
    app.state.rate_limiter = RateLimiter(settings)
    app.state.scheduler = Scheduler(settings, app.state.sessionmaker, app.state.celery)
    add_error_handlers(app)
    app.add_middleware(BodyLimits, max_bytes=settings.max_request_bytes)
    app.include_router(health.router)
    app.include_router(batches.router)
    app.include_router(submit.submit_router())
    app.include_router(jobs.router)
    app.include_router(schedules.router)
    app.include_router(report.router)
    app.include_router(webhooks.router)
    add_offline_docs(app)
    setup_metrics(app)  # request metrics and GET /metrics
    instrument_app(app)  # traces, when OTEL_EXPORTER_OTLP_ENDPOINT is set
    return app


app: FastAPI  # `uvicorn service.main:app`, see __getattr__


def __getattr__(name: str) -> FastAPI:
    # `uvicorn service.main:app`: built on first access, so importing create_app (tests,
    # `shortened serve`) does not also build an app from the environment.
    if name == "app":
        global app
        settings = get_settings()
        # The production entry point: JSON logs by default (uvicorn's loggers included).
        configure_logging(settings.log_format, settings.log_level)
        app = create_app(settings)
        return app
    raise AttributeError(name)
