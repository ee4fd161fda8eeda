"""Cancelled jobs do not delay the next one: the real embedded service (``python -m
service.serve``: API + one worker subprocess, SQLite, filesystem broker, one task per child),
N=200 jobs submitted and each cancelled right away, then one more job; the figure is the time
from the last cancel to that job running (its ``started_at``, as the job store records it).

    python -m bench.bench_drain          # prints one JSON object
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import e2e_service as e2e  # noqa: E402  (tests/e2e_service.py: the e2e tests' stack helpers)

N_CANCELLED = 200
TARGET_S = 5.0


def run() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    port = e2e.free_port()
    env = e2e.base_env(
        {
            "SHORTENED_DATA_DIR": str(root / "var"),
            "SHORTENED_API_PORT": str(port),
            "SHORTENED_WORKER_METRICS_PORT": "0",
            "PYTHONPATH": str(REPO),
        }
    )
    serve = e2e.start_process([sys.executable, "-m", "service.serve"], env, root / "serve.log")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            e2e.wait_until(
                lambda: e2e._answers(f"http://127.0.0.1:{port}/readyz"), 120, "serve", serve
            )
            submit_started = time.monotonic()
            for _ in range(N_CANCELLED):
                job_id = e2e.submit(api, e2e.prune_spec())
                response = api.post(f"/jobs/{job_id}/cancel")
                assert response.status_code == 200, response.text
            last_cancel = time.monotonic()
            submit_s = last_cancel - submit_started
            next_job = e2e.submit(api, e2e.prune_spec())
            job = e2e.wait_for_job(
                api, next_job, statuses=("running", *e2e.FINISHED), timeout=600, worker=serve
            )
            running_after_s = time.monotonic() - last_cancel
            final = e2e.wait_for_job(api, next_job, timeout=600, worker=serve)
            started = datetime.fromisoformat(final["started_at"])
            created = datetime.fromisoformat(final["created_at"])
            ran_in_pool = serve.log().count("succeeded in")
    finally:
        serve.popen.send_signal(signal.SIGTERM)
        try:
            serve.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.popen.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        {
            "measure": f"last cancel -> next job running, after {N_CANCELLED} cancelled (s)",
            "value": round(running_after_s, 2),
            "target": f"<= {TARGET_S:g}",
            "met": running_after_s <= TARGET_S,
        },
        {
            "measure": "next job queued -> running, job store clock (s)",
            "value": round((started - created).total_seconds(), 2),
            "target": "",
            "met": None,
        },
    ]
    context = {
        "cancelled_jobs": N_CANCELLED,
        "submit_and_cancel_s": round(submit_s, 1),
        "next_job_status": final["status"],
        "next_job_first_seen": job["status"],
        "tasks_run_in_pool": ran_in_pool,
    }
    return {"name": "drain", "rows": rows, "context": context}


if __name__ == "__main__":
    print(json.dumps(run()))
