"""The Celery app: Redis (or the embedded filesystem transport) as the broker only.

Job state lives in the job store; the message carries nothing but a job id, and the
result backend is not used. Run a worker with:

    celery -A worker.celery_app worker -Q gpu --concurrency 1 --pool prefork

No torch/CUDA is imported here or in the parent worker process: the engine is imported
inside the task, in the forked child, so CUDA is initialised only where it is used.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from service.queue import (  # noqa: F401  (re-exported: the worker's view of the queue)
    RUN_JOB_TASK,
    broker_transport_options,
    filesystem_broker_folders,
    make_celery,
)


def connect_observability() -> None:
    """Worker-side logging (JSON by default, with the job id) and Prometheus /metrics.
    Signal receivers only: nothing happens in processes that never start a worker (the API)."""
    from celery import signals

    from shortened.logs import setup_celery_logging
    from worker.metrics import connect_signals

    signals.setup_logging.connect(setup_celery_logging, weak=False)
    connect_signals()
    # Per pool process: the span exporter's thread does not survive the fork.
    signals.worker_process_init.connect(_start_tracing, weak=False)


def _start_tracing(**_: Any) -> None:
    from service.tracing import configure

    configure("worker")  # only when OTEL_EXPORTER_OTLP_ENDPOINT is set


def connect_shutdown() -> None:
    """Warm shutdown gives the running jobs back to the queue (see worker.dispatch)."""
    from celery import signals

    from worker.dispatch import on_worker_shutting_down

    signals.worker_shutting_down.connect(on_worker_shutting_down, weak=False)


connect_observability()
connect_shutdown()

_app: Celery | None = None


def __getattr__(name: str) -> Any:
    # Built on first use rather than at import, so the API can import make_celery
    # without also building an app (and broker folders) from the environment.
    global _app
    if name in ("app", "celery"):
        if _app is None:
            _app = make_celery(include=["worker.tasks"])
        return _app
    raise AttributeError(name)
