"""``shortened serve`` after a crash and at shutdown, with real processes (API, worker
subprocess, pool children; SQLite, filesystem broker, local artifacts):

* killed outright mid-upload, then restarted: the job left 'running' is retried while it has
  attempts left (else failed with worker_lost), and no object of the killed upload is left
  under the job's prefix either way;
* stopped with SIGINT (Ctrl-C) or SIGTERM while a job runs: a warm shutdown, exit status 0, the
  job re-queued and run to the end by the next start.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e_service import (
    Process,
    _answers,
    base_env,
    free_port,
    prune_spec,
    start_process,
    submit,
    wait_for_job,
    wait_until,
)

pytestmark = pytest.mark.e2e

SERVE = (
    "import service.serve as s, service.commands as c; s.WORKER_APP = 'tests.slow_worker'; "
    "c.main(['serve'])"
)


def start_serve(root: Path, port: int, log_name: str, **env: str) -> Process:
    process = start_process(
        [sys.executable, "-c", SERVE],
        base_env(
            {
                "SHORTENED_DATA_DIR": str(root / "var"),
                "SHORTENED_API_PORT": str(port),
                "SHORTENED_WORKER_METRICS_PORT": "0",
                **env,
            }
        ),
        root / log_name,
    )
    wait_until(lambda: _answers(f"http://127.0.0.1:{port}/readyz"), 120, "serve", process)
    return process


def stored(root: Path, job_id: str) -> set[str]:
    prefix = root / "var" / "artifacts" / "jobs" / job_id
    return {str(p.relative_to(prefix)) for p in prefix.rglob("*") if p.is_file()}


def kill_everything(process: Process) -> None:
    """A crash: serve, its worker and the pool children SIGKILLed at once (the worker runs in
    a session of its own, so a process-group kill would not reach it)."""
    family = [psutil.Process(process.popen.pid)]
    family += family[0].children(recursive=True)
    for member in family:
        member.kill()
    psutil.wait_procs(family, timeout=30)
    process.popen.wait(timeout=30)


def job_status(root: Path, job_id: str) -> str | None:
    from service.db import make_engine, make_sessionmaker
    from service.stores import job_reads

    engine = make_engine(f"sqlite:///{root / 'var' / 'shortened.db'}")
    try:
        with make_sessionmaker(engine)() as session:
            return job_reads.job_status(session, job_id)
    finally:
        engine.dispose()


def stop(process: Process, sig: signal.Signals = signal.SIGTERM) -> int:
    process.popen.send_signal(sig)
    return process.popen.wait(timeout=90)


@pytest.mark.parametrize("max_attempts", [3, 1])
def test_a_crash_mid_upload_is_retried_or_failed_and_leaves_no_orphans(
    tmp_path: Path, max_attempts: int
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {"SHORTENED_MAX_ATTEMPTS": str(max_attempts)}
    serve = start_serve(tmp_path, port, "serve-1.log", SLOW_PUBLISH_DELAY_S="30", **settings)
    try:
        with httpx.Client(base_url=url, timeout=30) as api:
            job_id = submit(api, prune_spec())
            wait_until(lambda: stored(tmp_path, job_id), 300, "the upload to start", serve)
    finally:
        kill_everything(serve)
    partial = stored(tmp_path, job_id)
    assert partial and "manifest.json" not in partial

    serve = start_serve(tmp_path, port, "serve-2.log", **settings)
    try:
        with httpx.Client(base_url=url, timeout=30) as api:
            job = wait_for_job(api, job_id, worker=serve)
            events = api.get(f"/jobs/{job_id}/events").json()
            messages = [e["message"] for e in events if e["type"] == "status"]
            if max_attempts > 1:
                assert job["status"] == "succeeded", (job, serve.log()[-3000:])
                assert "re-queued: the worker of attempt 1 was lost" in messages
                manifest = json.loads(
                    (tmp_path / "var/artifacts/jobs" / job_id / "manifest.json").read_text()
                )
                # Exactly what the manifest lists: nothing of the killed upload is left over.
                assert stored(tmp_path, job_id) == {
                    "manifest.json",
                    *(f["name"] for f in manifest["files"]),
                }
            else:
                assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
                assert stored(tmp_path, job_id) == set()
    finally:
        assert stop(serve) == 0, serve.log()[-3000:]


def test_ctrl_c_is_a_warm_shutdown_and_the_job_runs_after_restart(tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = start_serve(tmp_path, port, "serve-1.log", RELIABILITY_BLOCK_DELAY_S="2")
    with httpx.Client(base_url=url, timeout=30) as api:
        job_id = submit(api, prune_spec())
        wait_for_job(api, job_id, statuses=("running",), stage="scoring", worker=serve)
        assert stop(serve, signal.SIGINT) == 0, serve.log()[-3000:]
        log = serve.log()
        assert f"job {job_id} re-queued: the worker is shutting down" in log
        # The job was not left 'running' to a dead worker: it waits for the next start.
        assert job_status(tmp_path, job_id) == "queued"

        serve = start_serve(tmp_path, port, "serve-2.log")
        try:
            job = wait_for_job(api, job_id, worker=serve)
            assert job["status"] == "succeeded", (job, serve.log()[-3000:])
            assert job["attempts"] == 2
            statuses = [e["message"] for e in api.get(f"/jobs/{job_id}/events").json()]
            assert "re-queued: the worker of attempt 1 shut down" in statuses
        finally:
            assert stop(serve, signal.SIGTERM) == 0, serve.log()[-3000:]
