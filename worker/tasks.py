"""The Celery task: run one job, whose id is the whole message.

The task is a thin wrapper over :class:`worker.run.JobRun` (claim -> engine -> publish ->
finish), with the job id on every log line and the worker's job metrics around it. The
engine (torch) is imported inside the run, i.e. in the forked child.
"""

from __future__ import annotations

import os

from shortened.config import Settings, get_settings
from shortened.logs import job_context
from worker import metrics as worker_metrics
from worker.celery_app import RUN_JOB_TASK, app
from worker.run import JobRun, worker_id

# Progress goes to the job store; tqdm bars from transformers/huggingface_hub would only
# clutter the worker log (read when huggingface_hub is first imported, in the child).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def execute_job(job_id: str, settings: Settings | None = None) -> str | None:
    """Run job ``job_id`` to a final status and return it (see ``JobRun.execute``), with the
    job id on every log line and the worker's job metrics (duration by outcome, stage
    durations; see worker.metrics)."""
    with job_context(job_id), worker_metrics.job_run() as run:
        run.outcome = JobRun(job_id, settings or get_settings(), worker_id()).execute()
        return run.outcome


# The message of a job that is no longer queued is dropped before it reaches the pool.
@app.task(name=RUN_JOB_TASK, ignore_result=True, Request="worker.dispatch:JobRequest")
def run_job(job_id: str) -> None:
    """Run job ``job_id`` (which must be 'queued'); its outcome is recorded in the job store."""
    execute_job(job_id)
