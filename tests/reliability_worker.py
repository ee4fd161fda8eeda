"""Celery app for the reliability end-to-end tests: ``celery -A reliability_worker worker``.

The real app, tasks and engine, with one change: after each scored block is reported, the
worker sleeps ``RELIABILITY_BLOCK_DELAY_S`` seconds. A tiny model scores a block in
milliseconds; this stretches a job so a fault (SIGKILL, broker restart, cancel, redelivery)
lands mid-scoring, at a known block, whatever the machine's speed.

``RELIABILITY_RESTORE_SWEEP_S`` makes kombu look for messages past their visibility timeout
every that many seconds (its default is about every 100 s), for the redelivery test.
"""

from __future__ import annotations

import os
import time

from shortened.engine.progress import Progress
from worker import tasks  # noqa: F401  (registers the task on the app)
from worker.celery_app import app  # the app Celery looks for
from worker.reporter import JobReporter

DELAY_S = float(os.environ.get("RELIABILITY_BLOCK_DELAY_S", "0"))
if sweep := os.environ.get("RELIABILITY_RESTORE_SWEEP_S"):
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "unacked_restore_interval": float(sweep),
        "unacked_restore_throttle": 1,
    }
_report = JobReporter.__call__


def _slow_report(self: JobReporter, progress: Progress) -> None:
    _report(self, progress)
    if DELAY_S and progress.stage == "scoring" and progress.unit == "blocks" and progress.done:
        time.sleep(DELAY_S)


JobReporter.__call__ = _slow_report  # type: ignore[method-assign]
