"""Reliability end to end, with real processes: no job lost or run twice under crashes, restarts
and redeliveries.

uvicorn API (with its reaper thread) + ``python -m service.reaper`` + real Celery workers
(``tests/reliability_worker.py``: the real tasks and engine, each scored block followed by a
short sleep so faults land mid-job) + PostgreSQL + Redis (a namespaced DB of the shared
server, or a dedicated ``redis-server`` that the test stops and restarts) + a shared local
artifact store, on models/tiny-llama. Faults: SIGKILL of a worker's whole process group,
a tiny visibility timeout (Redis redelivers a running job's message), cancellation of queued
and running jobs, Redis stopped (empty on restart) while jobs are queued and running, and the
API restarted meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import reliability_figures as figures
from tests.e2e_service import (
    CALIBRATION,
    FINISHED,
    REPO,
    TINY_MODEL,
    Process,
    base_env,
    download_artifacts,
    free_port,
    message_ignored,
    postgres_database,
    redis_namespace,
    start_api,
    start_process,
    wait_for_job,
    wait_until,
)
from worker.processes import pid_alive

pytestmark = pytest.mark.e2e

TESTS = Path(__file__).resolve().parents[1]


def spec(**overrides) -> dict:
    """12 blocks scored (every block of the 12-layer tiny model)."""
    body = {
        "model": str(TINY_MODEL),
        "criterion": "ppl",
        "num_blocks": 2,
        "score_all_blocks": True,
        "protect_first": 1,
        "protect_last": 1,
        "calibration": {"source": str(CALIBRATION), "n_samples": 8},
        "device": "cpu",
    }
    body.update(overrides)
    return body


def common_env(database_url: str, broker_url: str, queue: str, artifacts: Path) -> dict[str, str]:
    return {
        "SHORTENED_DATABASE_URL": database_url,
        "SHORTENED_BROKER_URL": broker_url,
        "SHORTENED_QUEUE": queue,
        "SHORTENED_ARTIFACTS_URL": artifacts.as_uri(),
        "SHORTENED_ALLOWED_LOCAL_ROOTS": json.dumps(
            [str(TINY_MODEL.parent), str(CALIBRATION.parent)]
        ),
        # Seconds, not minutes: a lost worker is noticed ~4 s after its last heartbeat.
        "SHORTENED_LEASE_TTL_S": "4",
        "SHORTENED_HEARTBEAT_INTERVAL_S": "0.5",
        "SHORTENED_REAPER_INTERVAL_S": "0.5",
        "SHORTENED_REDISPATCH_AFTER_S": "3",
        "SHORTENED_MAX_ATTEMPTS": "3",
    }


def start_workers(
    env: dict[str, str], queue: str, logs: Path, names: list[str], **extra: str
) -> list[Process]:
    """Start workers in parallel (their start-up dominates), return them once all are ready."""
    env = {**env, **extra, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    workers = [
        start_process(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "reliability_worker",
                "worker",
                "-Q",
                queue,
                "--concurrency",
                "1",
                "--pool",
                "prefork",
                "--loglevel",
                "INFO",
                "--hostname",
                f"{name}-{queue}@%h",
                "--without-mingle",
                "--without-gossip",
            ],
            env,
            logs / f"{name}.log",
        )
        for name in names
    ]
    for worker in workers:
        wait_until(lambda w=worker: " ready." in w.log(), 90, "a Celery worker", worker)
    return workers


def kill_group(process: Process) -> None:
    """SIGKILL the worker and its pool children at once: no cleanup, no ack, nothing."""
    os.killpg(process.popen.pid, signal.SIGKILL)
    process.popen.wait(timeout=10)


def stop_all(processes: list[Process]) -> None:
    for process in processes:
        if process.popen.poll() is None:
            process.stop(timeout=30)


def attempt_pid(job: dict, index: int = -1) -> int:
    return int(job["attempt_history"][index]["worker"].rsplit(":", 1)[1])


def scored(api: httpx.Client, job_id: str, at_least: int) -> dict | None:
    job = api.get(f"/jobs/{job_id}").json()
    if job["status"] in FINISHED:
        raise AssertionError(f"job {job_id} finished before the fault: {job}")
    in_scoring = job["stage"] == "scoring" and job["progress"]["done"] >= at_least
    return job if in_scoring else None


def duplicates_ignored(workers: list[Process], job_id: str) -> int:
    return sum(message_ignored(w.log(), job_id) for w in workers)


def assert_ran_once(job: dict) -> None:
    assert not figures.attempts_overlap(job["attempt_history"]), job["attempt_history"]
    ends = [a for a in job["attempt_history"] if a["outcome"] not in ("worker_lost", "running")]
    assert len(ends) == 1, job["attempt_history"]


@dataclass
class Stack:
    api: httpx.Client
    env: dict[str, str]
    root: Path
    queue: str
    artifacts: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """API (reaper thread on) against PostgreSQL, a Redis namespace and a local store."""
    from service.db import upgrade_database

    root = tmp_path_factory.mktemp("reliability")
    with redis_namespace() as (broker_url, queue), postgres_database() as database_url:
        upgrade_database(database_url)
        env = common_env(database_url, broker_url, queue, root / "artifacts")
        api_process, url = start_api(
            base_env({**env, "SHORTENED_DATA_DIR": str(root / "api")}),
            free_port(),
            root / "api.log",
        )
        try:
            with httpx.Client(base_url=url, timeout=30) as api:
                yield Stack(api, env, root, queue, root / "artifacts")
        finally:
            api_process.stop()


def worker_env(stack: Stack, node: str) -> dict[str, str]:
    return base_env({**stack.env, "SHORTENED_DATA_DIR": str(stack.root / node)})


def test_sigkilled_worker_job_is_retried_once_and_resumes(stack: Stack, tmp_path: Path):
    api = stack.api
    # A second reaper next to the API's own: replicas must not double-act.
    reaper = start_process(
        [sys.executable, "-m", "service.reaper", "--interval", "0.5"],
        base_env({**stack.env, "SHORTENED_DATA_DIR": str(stack.root / "reaper")}),
        stack.root / "reaper.log",
    )
    # Two workers on one node (one data directory), as after a pod restart on the same disk.
    workers = start_workers(
        worker_env(stack, "node-a"),
        stack.queue,
        stack.root,
        ["w1", "w2"],
        RELIABILITY_BLOCK_DELAY_S="0.4",
    )
    try:
        job_id = api.post("/jobs/prune", json=spec()).json()["id"]
        job = wait_until(lambda: scored(api, job_id, 4), 120, "4 blocks scored", workers[0])
        child = attempt_pid(job)
        [victim] = [w for w in workers if os.getpgid(child) == w.popen.pid]
        [survivor] = [w for w in workers if w is not victim]
        killed_at = time.monotonic()
        kill_group(victim)
        figures.fault("worker_sigkill")

        job = wait_for_job(api, job_id, timeout=180, worker=survivor)
        assert job["status"] == "succeeded", job
        # Noticed through the lease (4 s TTL), not Redis' 12 h visibility timeout.
        assert time.monotonic() - killed_at < 60
        history = job["attempt_history"]
        assert [(a["attempt"], a["outcome"]) for a in history] == [
            (1, "worker_lost"),
            (2, "succeeded"),
        ]
        assert history[0]["worker"] != history[1]["worker"] and attempt_pid(job, 0) == child
        assert_ran_once(job)
        # Re-queued exactly once although two reapers were watching.
        events = api.get(f"/jobs/{job_id}/events").json()
        assert sum("re-queued" in e["message"] for e in events) == 1
        # The retry skipped the blocks the lost attempt had scored (saved in the store).
        assert job["result"]["resumed_scores"] >= 4
        stages = [e["message"] for e in events if e["type"] == "stage"]
        assert any("resuming" in message for message in stages), stages
        # The output is complete and verified; the dead attempt's temp files are gone.
        download_artifacts(api, job_id, tmp_path / "model")
        assert list((stack.root / "node-a" / "tmp").iterdir()) == []
        assert not (stack.artifacts / "scratch" / job_id).exists()
        figures.record_jobs([job])
        figures.count(resumed_attempts=1)
    finally:
        stop_all([*workers, reaper])


@pytest.fixture
def redelivering_workers(stack: Stack) -> Iterator[list[Process]]:
    """Two workers whose Redis transport redelivers an unacknowledged message after 2 s
    (production: 12 h), checking for such messages every second. Only for one job: with
    one child process per job, a duplicate waiting for the next child to start (seconds)
    would itself be redelivered again and again."""
    workers = start_workers(
        base_env(
            {
                **stack.env,
                "SHORTENED_DATA_DIR": str(stack.root / "node-b"),
                "SHORTENED_VISIBILITY_TIMEOUT_S": "2",
            }
        ),
        stack.queue,
        stack.root,
        ["w3", "w4"],
        RELIABILITY_BLOCK_DELAY_S="0.6",
        RELIABILITY_RESTORE_SWEEP_S="1",
    )
    try:
        yield workers
    finally:
        stop_all(workers)


def test_a_redelivered_message_does_not_run_the_job_twice(stack: Stack, redelivering_workers):
    api, workers = stack.api, redelivering_workers
    job_id = api.post("/jobs/prune", json=spec()).json()["id"]
    # The job runs ~8 s; its message is redelivered after 2 s to the other, idle, worker.
    wait_until(
        lambda: duplicates_ignored(workers, job_id), 60, "the redelivered message", workers[0]
    )
    job = wait_for_job(api, job_id, timeout=120, worker=workers[0])
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and [a["outcome"] for a in job["attempt_history"]] == ["succeeded"]
    assert_ran_once(job)
    statuses = [
        e["data"]["status"]
        for e in api.get(f"/jobs/{job_id}/events").json()
        if e["type"] == "status"
    ]
    assert statuses == ["queued", "running", "succeeded"]
    duplicates = duplicates_ignored(workers, job_id)
    figures.fault("visibility_timeout_redelivery", duplicates)
    figures.count(duplicates_ignored=duplicates)
    figures.record_jobs([job])


@pytest.fixture
def worker_pair(stack: Stack) -> Iterator[list[Process]]:
    workers = start_workers(
        worker_env(stack, "node-c"),
        stack.queue,
        stack.root,
        ["w6", "w7"],
        RELIABILITY_BLOCK_DELAY_S="0.6",
    )
    try:
        yield workers
    finally:
        stop_all(workers)


def test_cancel_queued_and_running_jobs(stack: Stack, worker_pair):
    api, workers = stack.api, worker_pair
    running = [api.post("/jobs/prune", json=spec()).json()["id"] for _ in range(2)]
    wait_until(
        lambda: all(api.get(f"/jobs/{j}").json()["status"] == "running" for j in running),
        60,
        "both workers to take a job",
        workers[0],
    )
    # Both workers are busy: a third job waits in the queue, and is cancelled there.
    queued = api.post("/jobs/prune", json=spec()).json()["id"]
    response = api.post(f"/jobs/{queued}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    # Each running job is cancelled as soon as it is seen scoring.
    children: dict[str, int] = {}

    def cancel_when_scoring() -> bool:
        for job_id in running:
            if job_id not in children and scored(api, job_id, 2):
                response = api.post(f"/jobs/{job_id}/cancel")
                assert response.status_code == 202, response.text
                children[job_id] = attempt_pid(response.json())
        return len(children) == len(running)

    wait_until(cancel_when_scoring, 120, "both jobs scoring", workers[0], interval=0.1)
    jobs = [wait_for_job(api, job_id, timeout=60, worker=workers[0]) for job_id in running]
    for job in jobs:
        assert job["status"] == "cancelled" and job["artifacts"] is None and job["error"] is None
        events = api.get(f"/jobs/{job['id']}/events").json()
        asked = next(e["seq"] for e in events if e["message"] == "cancel requested")
        # Stopped within one block: at most the block in flight reported after the request.
        assert sum(e["type"] == "metric" and e["seq"] > asked for e in events) <= 1
        assert not (stack.artifacts / "jobs" / job["id"]).exists()  # nothing published
        assert not (stack.artifacts / "scratch" / job["id"]).exists()
    # The process that held the model exits (one job per child): its memory is freed.
    for pid in children.values():
        wait_until(lambda p=pid: not pid_alive(p), 30, f"the job's process {pid} to exit")
    assert list((stack.root / "node-c" / "tmp").iterdir()) == []
    queued_job = api.get(f"/jobs/{queued}").json()
    assert queued_job["attempts"] == 0 and queued_job["attempt_history"] == []
    figures.fault("cancel", 3)
    figures.record_jobs([*jobs, queued_job])


# ---------------------------------------------------------------------------- broker and API restarts


@contextmanager
def redis_server(
    port: int, log_path: Path
) -> Iterator[tuple[Callable[[], None], Callable[[], None]]]:
    """A dedicated, non-persistent Redis: a restart loses every queued message."""
    processes: list[subprocess.Popen] = []

    def start() -> None:
        processes.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--logfile",
                    str(log_path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        import redis

        client = redis.Redis("127.0.0.1", port)
        wait_until(lambda: _pings(client), 20, "redis-server")

    def stop() -> None:
        process = processes[-1]
        process.terminate()
        process.wait(timeout=20)

    start()
    try:
        yield stop, start
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def test_redis_and_api_restarts_lose_no_job(tmp_path: Path):
    from service.db import upgrade_database

    port = free_port()
    with (
        redis_server(port, tmp_path / "redis.log") as (stop_redis, start_redis),
        postgres_database() as database_url,
    ):
        upgrade_database(database_url)
        env = common_env(
            database_url, f"redis://127.0.0.1:{port}/0", "restarts", tmp_path / "artifacts"
        )
        api_env = base_env({**env, "SHORTENED_DATA_DIR": str(tmp_path / "api")})
        [worker] = start_workers(
            base_env({**env, "SHORTENED_DATA_DIR": str(tmp_path / "node")}),
            "restarts",
            tmp_path,
            ["w5"],
            RELIABILITY_BLOCK_DELAY_S="0.4",
        )
        api_process, url = start_api(api_env, free_port(), tmp_path / "api.log")
        api = httpx.Client(base_url=url, timeout=30)
        try:
            running = api.post("/jobs/prune", json=spec()).json()["id"]
            wait_until(lambda: scored(api, running, 2), 120, "scoring", worker)
            # Two more wait in Redis behind it (one job at a time per worker).
            quick = spec(score_all_blocks=False, num_blocks=1, protect_first=9, protect_last=1)
            queued = [api.post("/jobs/prune", json=quick).json()["id"] for _ in range(2)]

            stop_redis()
            figures.fault("redis_restart")
            # Reads keep working; readiness names the broker; a submission is kept, queued.
            assert api.get(f"/jobs/{running}").status_code == 200
            assert api.get("/jobs").status_code == 200
            ready = api.get("/readyz")
            assert ready.status_code == 503
            components = ready.json()["components"]
            assert components["broker"]["ok"] is False and components["database"]["ok"] is True
            started = time.monotonic()
            kept = api.post("/jobs/prune", json=quick)
            assert kept.status_code == 202, kept.text
            assert kept.json()["status"] == "queued"
            assert time.monotonic() - started < 15
            queued.append(kept.json()["id"])
            figures.fault("broker_down_at_submission")

            # The API restarts while Redis is down: nothing of the jobs lived in it.
            api_process.stop()
            api_process, url = start_api(api_env, free_port(), tmp_path / "api2.log")
            api.close()
            api = httpx.Client(base_url=url, timeout=30)
            figures.fault("api_restart")
            assert api.get(f"/jobs/{queued[0]}").json()["status"] == "queued"

            start_redis()  # empty: the queued jobs' messages are gone
            jobs = [
                wait_for_job(api, job_id, timeout=180, worker=worker)
                for job_id in [running, *queued]
            ]
            for job in jobs:
                assert job["status"] == "succeeded", job
                assert job["attempts"] == 1
                assert_ran_once(job)
            # The queued jobs came back through the re-dispatcher.
            for job_id in queued:
                events = api.get(f"/jobs/{job_id}/events").json()
                assert [e["data"]["status"] for e in events if e["type"] == "status"] == [
                    "queued",
                    "running",
                    "succeeded",
                ]
            assert api.get("/readyz").status_code == 200
            figures.record_jobs(jobs)
        finally:
            api.close()
            stop_all([api_process, worker])
