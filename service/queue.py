"""The producer side of the job queue: the task name and the Celery configuration that the API
(which sends) and the worker (which consumes, ``worker/celery_app.py``) share.

The broker carries nothing but a job id; job state lives in the job store and the result
backend is not used. Nothing here imports torch or worker code.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from celery import Celery, signals
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr

from shortened.config import Settings, get_settings

RUN_JOB_TASK = "shortened.run_job"

# Celery apps (one per API process) that have sent a message, so declared the queue.
_declared: weakref.WeakSet[Celery] = weakref.WeakSet()
# Per app: (process id, the function that pushes a job's message), see _direct_sender.
_direct: weakref.WeakKeyDictionary[Celery, tuple[int, Callable[[str], None] | None]] = (
    weakref.WeakKeyDictionary()
)
_NO_LINKS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def send_run_job(celery: Celery, job_id: str) -> None:
    """Send the task message of ``job_id`` (the message carries the id only; the worker reads
    the spec from the job store).

    The first message of the process goes through Celery's ``send_task``, which declares
    the queue. Later ones, on a Redis broker, are built here (:func:`run_job_message`, the
    message ``send_task`` would build) and pushed onto the queue by kombu's Redis channel,
    one LPUSH: ``send_task``'s routing, option merging and producer pool cost more than
    the push itself, about 0.25 ms of an admission's CPU (0.39-0.46 ms a send against
    0.16-0.19). Whenever anything could want what
    ``send_task`` adds (a receiver of the publish signals, such as the OpenTelemetry
    instrumentation that puts the trace context in the headers; task-sent events; another
    broker), every message goes through ``send_task``, which then skips re-declaring the
    queue (kombu would re-declare it on every publish, a fifth of a send's CPU; the queue,
    durable, stays declared)."""
    send = _direct_sender(celery) if celery in _declared and _plain_publish(celery) else None
    if send is not None:
        try:
            send(job_id)
        except Exception:
            _direct.pop(celery, None)  # a fresh connection for the next message
            raise
        return
    options: dict[str, Any] = {"declare": []} if celery in _declared else {}
    celery.send_task(RUN_JOB_TASK, args=[job_id], **options)
    _declared.add(celery)


def _plain_publish(celery: Celery) -> bool:
    """Nothing asks for more than the message itself: no receiver of Celery's publish
    signals, no task-sent events."""
    return not (
        signals.before_task_publish.receivers
        or signals.after_task_publish.receivers
        or celery.conf.task_send_sent_event
    )


def _direct_sender(celery: Celery) -> Callable[[str], None] | None:
    """What sends a job's message in one LPUSH: kombu's Redis channel's ``_put`` on a
    connection this process keeps for it (the channel's redis-py client is thread-safe);
    None for a broker other than Redis."""
    from service.redis_broker import RedisTransport

    cached = _direct.get(celery)
    if cached is not None and cached[0] == os.getpid():
        return cached[1]
    connection = celery.connection_for_write()
    send: Callable[[str], None] | None = None
    if isinstance(connection.transport, RedisTransport):
        channel = connection.default_channel
        queue = celery.amqp.router.route({}, RUN_JOB_TASK)["queue"].name
        app = weakref.ref(celery)  # not a strong reference: the app is this cache's key

        def send(job_id: str, _connection: Any = connection) -> None:
            reply_to = app().thread_oid  # type: ignore[union-attr]
            channel._put(queue, run_job_message(job_id, queue, reply_to))

    else:
        connection.release()
    _direct[celery] = (os.getpid(), send)
    return send


def run_job_message(job_id: str, queue: str, reply_to: str) -> dict[str, Any]:
    """The message ``celery.send_task(RUN_JOB_TASK, args=[job_id])`` puts on a Redis queue:
    task protocol 2, a JSON body, base64 in the envelope (a test holds it field for field to
    what Celery sends)."""
    task_id = str(uuid.uuid4())
    body = json.dumps([[job_id], {}, _NO_LINKS])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": RUN_JOB_TASK,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": saferepr([job_id]),
            "kwargsrepr": "{}",
            "origin": anon_nodename(),
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": reply_to,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


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
