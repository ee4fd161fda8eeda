"""The producer side of the job queue: the task name and the Celery configuration that the API
(which sends) and the worker (which consumes, ``worker/celery_app.py``) share.

The broker carries nothing but a job id; job state lives in the job store and the result
backend is not used. Nothing here imports torch or worker code.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import Celery

from shortened.config import Settings, get_settings

RUN_JOB_TASK = "shortened.run_job"

# Celery apps (one per API process) that have sent a message, so declared the queue.
_declared: weakref.WeakSet[Celery] = weakref.WeakSet()


def send_run_job(celery: Celery, job_id: str) -> None:
    """Send the task message of ``job_id`` (the message carries the id only; the worker reads
    the spec from the job store). The first message of the process declares the queue, as
    Celery does for every message; later ones skip it: kombu re-declares it on every publish
    otherwise, a fifth of a send's CPU, and the queue, durable, stays declared (with Redis
    or the filesystem broker a message names its queue directly anyway)."""
    options: dict[str, Any] = {"declare": []} if celery in _declared else {}
    celery.send_task(RUN_JOB_TASK, args=[job_id], **options)
    _declared.add(celery)


def filesystem_broker_folders(settings: Settings) -> tuple[Path, Path]:
    root = (settings.data_dir / "broker").resolve()
    return root / "queue", root / "processed"


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    url = settings.resolved_broker_url
    if url.startswith("filesystem://"):
        queue_dir, processed_dir = filesystem_broker_folders(settings)
        queue_dir.mkdir(parents=True, exist_ok=True)
        processed_dir.mkdir(parents=True, exist_ok=True)
        # One folder for in and out: producer (API) and consumer (worker) share it.
        return {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "processed_folder": str(processed_dir),
            "store_processed": False,
        }
    # Redis re-delivers a message that is not acknowledged within the visibility timeout.
    # With late acks a job is acknowledged only when it finishes, so the timeout must be
    # longer than the longest job, or a healthy hour-long job would be started again.
    return {"visibility_timeout": settings.visibility_timeout_s}


def broker_transport(url: str) -> str | None:
    """The transport class for ``url``: ``service.redis_broker.RedisTransport`` for plain Redis
    (imported by kombu when it connects: nothing imports redis-py before that), kombu's
    choice otherwise (Sentinel, the filesystem broker)."""
    redis = url.startswith(("redis://", "rediss://"))
    return "service.redis_broker:RedisTransport" if redis else None


def make_celery(settings: Settings | None = None, include: Sequence[str] = ()) -> Celery:
    """The Celery app with every option producer and consumer must agree on. The API uses it
    as is (it only sends); the worker passes ``include=["worker.tasks"]``."""
    settings = settings or get_settings()
    app = Celery("shortened", broker=settings.resolved_broker_url, include=list(include))
    app.conf.update(
        broker_transport=broker_transport(settings.resolved_broker_url),
        broker_transport_options=broker_transport_options(settings),
        # Keep retrying the broker at start-up instead of exiting (Redis may start later),
        # and after a lost connection for as long as it takes (Redis restarted): a worker
        # that gave up would leave its running job to the reaper for nothing.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Redis is only the broker: job state is in the database, results are not stored.
        task_ignore_result=True,
        result_backend=None,
        task_routes={RUN_JOB_TASK: {"queue": settings.queue}},
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        # Take one message at a time: with hour-long jobs a prefetched message would sit
        # behind the running job while another worker is idle.
        worker_prefetch_multiplier=1,
        # Acknowledge after the job, not before, and give the message back if the worker
        # process dies (OOM, node lost): the job is not silently dropped. The task is
        # idempotent (it only runs a 'queued' job), so a redelivery never runs it twice.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A broker hiccup should not kill an hour of GPU work; the late ack still lands
        # (or the redelivered message is a no-op because the job is no longer queued).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Backstops of the job time limit, which the task enforces itself at every progress
        # report: the soft limit interrupts a job stuck between reports (it fails with code
        # timeout); the hard one kills the child, and the reaper then fails the job (timeout)
        # once its lease expires.
        task_soft_time_limit=settings.job_time_limit_s + 60,
        task_time_limit=settings.job_time_limit_s + 300,
        # One job per GPU, and a fresh child process per job: the only sure way to give
        # all GPU memory (and the CUDA context) back between jobs.
        worker_concurrency=settings.worker_concurrency,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app
