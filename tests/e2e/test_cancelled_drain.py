"""Cancelled jobs cost the worker nothing: their messages are dropped in the worker's main
process and never take a pool slot (nor a fresh child process), and the next job runs.

Real processes on the embedded stack: the API under uvicorn and a Celery worker sharing one
data directory (SQLite job store, filesystem broker, local artifacts). The jobs are submitted
and cancelled before the worker starts, so every one of their messages waits in the broker.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.e2e_service import (
    base_env,
    free_port,
    prune_spec,
    start_api,
    start_worker,
    submit,
    wait_for_job,
    wait_until,
)

pytestmark = pytest.mark.e2e

CANCELLED = 12


def dropped_counter(metrics_url: str) -> dict[str, float]:
    text = httpx.get(metrics_url, timeout=5).text
    return {
        status: float(value)
        for status, value in re.findall(
            r'^shortened_worker_messages_dropped_total\{status="(\w+)"\} (\S+)$', text, re.M
        )
    }


def test_cancelled_jobs_messages_never_reach_the_pool(tmp_path: Path):
    metrics_port = free_port()
    env = base_env(
        {
            "SHORTENED_DATA_DIR": str(tmp_path / "var"),
            "SHORTENED_WORKER_METRICS_PORT": str(metrics_port),
        }
    )
    api_process, url = start_api(env, free_port(), tmp_path / "api.log")
    worker = None
    try:
        with httpx.Client(base_url=url, timeout=30) as api:
            cancelled = []
            for _ in range(CANCELLED):
                job_id = submit(api, prune_spec())
                response = api.post(f"/jobs/{job_id}/cancel")
                assert response.status_code == 200, response.text
                cancelled.append(job_id)
            worker = start_worker(env, "gpu", tmp_path / "worker.log")
            next_job = submit(api, prune_spec())
            job = wait_for_job(api, next_job, worker=worker)
            assert job["status"] == "succeeded", (job, worker.log()[-3000:])

            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            counts = wait_until(
                lambda: dropped_counter(metrics_url) or None, 30, "the worker's metrics"
            )
            assert counts == {"cancelled": CANCELLED}, counts
            log = worker.log()
            for job_id in cancelled:
                assert f"job {job_id} is cancelled: message dropped without running" in log
                # A pool child that got the message would have logged its no-op claim.
                assert f"job {job_id} is not queued" not in log
                assert api.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
            # Only the next job's message was handed to the pool (and ran there).
            assert len(re.findall(r"Task shortened\.run_job\[[^\]]+\] succeeded in", log)) == 1
    finally:
        api_process.stop()
        if worker is not None:
            worker.stop(timeout=60)
