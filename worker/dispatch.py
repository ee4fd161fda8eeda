"""The worker's main process: it drops the message of a job that no longer waits to run,
and gives running jobs back to the queue when the worker is shut down.

A job cancelled while queued keeps its message in the broker. Handed to the pool, that
message would take the only slot and, with one task per child, a fresh process (about a
second each) just to find the job is not queued: 200 cancelled jobs would hold the next one
back for minutes. ``JobRequest`` looks the job's status up in the main process, before the
pool sees the message, and acknowledges and drops it unless the job is still ``queued``.

It fits the other delivery rules: the reaper only re-sends messages of queued jobs (which
pass), a message of a job that another attempt is running is a duplicate (dropped), and a
failed look-up hands the message to the pool, whose claim (a compare-and-set) decides as
before.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.worker.request import Request
from celery.worker.state import task_ready
from sqlalchemy.orm import Session, sessionmaker

from service.db import make_engine, make_sessionmaker
from service.stores import job_reads, job_recovery
from shortened.config import get_settings
from worker import metrics as worker_metrics
from worker.processes import worker_id_for

log = logging.getLogger(__name__)

_sessions: sessionmaker[Session] | None = None


def _main_process_sessions() -> sessionmaker[Session]:
    global _sessions
    if _sessions is None:
        # Unpooled: the pool forks children from this process, and none may inherit an open
        # database connection.
        url = get_settings().resolved_database_url
        _sessions = make_sessionmaker(make_engine(url, pooled=False))
    return _sessions


def current_status(job_id: str) -> str | None:
    with _main_process_sessions()() as session:
        return job_reads.job_status(session, job_id)


class JobRequest(Request):  # type: ignore[misc]  # celery ships no type hints
    """Celery calls ``revoked()`` in the main process right before handing a request to the
    pool (and skips the pool when it is True): the place to drop a message for nothing."""

    def revoked(self) -> bool:
        if super().revoked():
            return True
        args: Any = self.args
        job_id = args[0] if args else None
        if not isinstance(job_id, str):
            return False
        try:
            status = current_status(job_id)
        except Exception as exc:  # the pool's claim decides, as it always could
            log.warning("job %s: could not look up its status: %s", job_id, exc)
            return False
        if status == "queued":
            return False
        shown = status or "unknown"
        log.info("job %s is %s: message dropped without running", job_id, shown)
        worker_metrics.MESSAGES_DROPPED.labels(shown).inc()
        task_ready(self)
        self.acknowledge()
        self._already_revoked = True
        return True


def requeue_running_jobs(job_ids_by_pid: dict[str, int]) -> list[str]:
    """Give the jobs this worker's children are running back to the queue: the children stop
    at their next progress report (their attempt no longer holds the job). Their messages are
    sent by the reaper's next round (an API replica's, or the next ``shortened serve``), not
    from here: this worker may go on consuming while it stops and would take them back."""
    requeued = []
    for job_id, pid in job_ids_by_pid.items():
        try:
            with _main_process_sessions()() as session:
                if not job_recovery.requeue_for_shutdown(session, job_id, worker_id_for(pid)):
                    continue
        except Exception as exc:  # the reaper re-queues it once its lease expires
            log.warning("job %s: could not re-queue it at shutdown: %s", job_id, exc)
            continue
        log.info("job %s re-queued: the worker is shutting down", job_id)
        requeued.append(job_id)
    return requeued


def on_worker_shutting_down(**_kwargs: Any) -> None:
    """Warm shutdown (SIGTERM) in the main process: the running jobs are re-queued rather
    than finished (they may take hours) or killed with the worker.

    Celery sends this from its signal handler, so the database work runs on a thread (never
    inside a handler that may have interrupted a query); not a daemon, so the process does
    not exit before it is done."""
    from celery.worker import state

    running = {
        request.args[0]: request.worker_pid
        for request in list(state.active_requests)
        if isinstance(request, JobRequest) and request.args and request.worker_pid
    }
    if running:
        threading.Thread(
            target=requeue_running_jobs, args=(running,), name="requeue-on-shutdown"
        ).start()
