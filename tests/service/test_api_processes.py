"""The API in several processes: ``python -m service.serve --api-only --api-workers 2``
against PostgreSQL and Redis, and ``shortened serve --api-workers 2`` in its embedded mode,
each a real process tree answering real HTTP."""

from __future__ import annotations

import json
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from service.db import upgrade_database
from tests import e2e_service as e2e

STARTUP_S = 120  # two spawned API processes importing the app, on a busy 2-core machine


def _api_processes(serve_pid: int) -> list[psutil.Process]:
    """The API processes uvicorn's supervisor spawned (not the Celery worker, not
    multiprocessing's resource tracker)."""
    return [
        child
        for child in psutil.Process(serve_pid).children()
        if "spawn_main" in " ".join(child.cmdline())
    ]


def _metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _pids_serving(metrics_dir: Path) -> set[int]:
    return {
        int(m.group(1))
        for f in metrics_dir.glob("*.db")
        if (m := re.search(r"_(\d+)\.db$", f.name))
    }


@pytest.fixture
def api_only(tmp_path: Path) -> Iterator[tuple[e2e.Process, str, Path]]:
    """(serve process, URL, data dir): two API processes over a fresh PostgreSQL database."""
    with two_api_processes(tmp_path) as served:
        yield served


@contextmanager
def two_api_processes(tmp_path: Path, **settings: str) -> Iterator[tuple[e2e.Process, str, Path]]:
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text((e2e.TINY_MODEL / "config.json").read_text())
    with e2e.redis_namespace() as (broker_url, queue), e2e.postgres_database() as database_url:
        upgrade_database(database_url)  # a deploy step with PostgreSQL: --api-only skips it
        port = e2e.free_port()
        env = e2e.base_env(
            {
                "SHORTENED_DATABASE_URL": database_url,
                "SHORTENED_BROKER_URL": broker_url,
                "SHORTENED_QUEUE": queue,
                "SHORTENED_DATA_DIR": str(tmp_path / "api"),
                "SHORTENED_ARTIFACTS_URL": (tmp_path / "artifacts").as_uri(),
                "SHORTENED_ALLOWED_LOCAL_ROOTS": json.dumps([str(tmp_path), str(e2e.REPO)]),
                "SHORTENED_REAPER_INTERVAL_S": "1",
                **settings,
            }
        )
        process = e2e.start_process(
            [
                sys.executable,
                "-m",
                "service.serve",
                "--api-only",
                "--api-workers",
                "2",
                "--port",
                str(port),
            ],
            env,
            tmp_path / "serve.log",
        )
        url = f"http://127.0.0.1:{port}"
        try:
            e2e.wait_until(lambda: e2e._answers(url + "/healthz"), STARTUP_S, "the API", process)
            yield process, url, tmp_path / "api"
        finally:
            process.stop()


def test_processes_share_the_job_store_and_merge_their_metrics(
    api_only: tuple[e2e.Process, str, Path],
) -> None:
    process, url, data_dir = api_only
    api_pids = {p.pid for p in _api_processes(process.popen.pid)}
    assert len(api_pids) == 2, process.log()[-3000:]
    assert "died" not in process.log()  # none restarted by the supervisor
    (metrics_dir,) = (data_dir / "metrics").glob(f"api-{process.popen.pid}-*")

    # A job submitted through one connection, read back through many fresh ones: the
    # processes share the job store, whichever answers.
    with httpx.Client(base_url=url, timeout=30) as client:
        job_id = e2e.submit(client, e2e.prune_spec(model=str(e2e.TINY_MODEL)))
    sent = 0
    for _ in range(300):  # until both processes have answered some (the kernel picks)
        response = httpx.get(f"{url}/jobs/{job_id}", headers={"Connection": "close"}, timeout=30)
        sent += 1
        assert response.status_code == 200, response.text
        assert response.json()["id"] == job_id and response.json()["status"] == "queued"
        if sent >= 20 and _pids_serving(metrics_dir) >= api_pids:
            break
    assert _pids_serving(metrics_dir) >= api_pids, "only one process answered"

    # /metrics, from either process: every process's requests, counted once.
    for _ in range(4):
        text = httpx.get(f"{url}/metrics", headers={"Connection": "close"}, timeout=30).text
        reads = _metric(
            text, "http_requests_total", 'handler="/jobs/{job_id}",method="GET",status="200"'
        )
        assert reads == sent
        assert _metric(text, "shortened_jobs", 'kind="prune",status="queued"') == 1, [
            line for line in text.splitlines() if line.startswith("shortened_jobs")
        ]

    # The reaper, scheduler and webhook dispatcher run once, in the supervisor.
    started = re.findall(r"background loops \(.*\) in process (\d+)", process.log())
    assert started == [str(process.popen.pid)], process.log()[-3000:]


def test_a_burst_of_keep_alive_connections_is_spread_over_the_processes(
    api_only: tuple[e2e.Process, str, Path],
) -> None:
    """40 clients connecting at once (a platform's pollers starting together) and keeping
    their connections: each process holds a fair share. On one shared listening socket the
    process that woke first could accept them all and leave the other idle."""
    import socket

    process, url, _ = api_only
    port = int(url.rsplit(":", 1)[1])

    def listening() -> bool:  # each process listens once its app has started
        apis = _api_processes(process.popen.pid)
        return len(apis) == 2 and all(
            any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port
                for c in api.net_connections(kind="tcp")
            )
            for api in apis
        )

    e2e.wait_until(listening, STARTUP_S, "both API processes listening", process)
    connections = [socket.socket() for _ in range(40)]
    for connection in connections:  # all at once: the kernel queues them before any accept
        connection.setblocking(False)
        connection.connect_ex(("127.0.0.1", port))
    for connection in connections:
        connection.setblocking(True)
    try:
        for connection in connections:  # one request each: every connection was accepted
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        for connection in connections:
            assert connection.recv(4096).startswith(b"HTTP/1.1 200")
        ours = {connection.getsockname()[1] for connection in connections}
        held = {
            api.pid: sum(
                1
                for c in api.net_connections(kind="tcp")
                if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ours
            )
            for api in _api_processes(process.popen.pid)
        }
    finally:
        for connection in connections:
            connection.close()
    assert sum(held.values()) == 40, held
    # Hashed over two sockets: below 8 of 40 has a chance of about 1e-5.
    assert min(held.values()) >= 8, held


def test_shortened_serve_with_two_api_processes_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = e2e.free_port()
    env = e2e.base_env({"SHORTENED_DATA_DIR": str(tmp_path / "var")})
    log_path = tmp_path / "serve.log"
    process = e2e.start_process(
        [sys.executable, "-m", "shortened.cli", "serve", "--api-workers", "2", "--port", str(port)],
        env,
        log_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        e2e.wait_until(lambda: e2e._answers(url + "/healthz"), STARTUP_S, "the API", process)
        tree = psutil.Process(process.popen.pid).children(recursive=True)
        assert len(_api_processes(process.popen.pid)) == 2
        workers = [
            p for p in psutil.Process(process.popen.pid).children() if "celery" in p.cmdline()
        ]
        assert len(workers) == 1  # one Celery worker, whatever the number of API processes
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(timeout=90) == 0, process.log()[-3000:]
    finally:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait()
    _gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    # The API processes' metrics directory was removed with them.
    assert not list((tmp_path / "var" / "metrics").glob("api-*"))
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", timeout=2)


def test_the_write_rate_limit_is_one_bucket_for_all_processes(tmp_path: Path) -> None:
    """A client opening a new connection per request reaches both processes; the tenant still
    gets the burst once, not once per process (the bucket is in Redis)."""
    import httpx

    burst = 6
    with two_api_processes(
        tmp_path, SHORTENED_WRITE_RATE_PER_S="0.01", SHORTENED_WRITE_BURST=str(burst)
    ) as (process, url, _):
        spec = {"model": str(tmp_path / "models" / "tiny"), "num_blocks": 1,
                "criterion": "magnitude"}  # fmt: skip
        assert len(_api_processes(process.popen.pid)) == 2
        statuses = []
        for _ in range(4 * burst):
            with httpx.Client(base_url=url) as client:  # a new connection each time
                response = client.post("/jobs/prune?dry_run=true", json=spec)
                statuses.append(response.status_code)
        assert statuses.count(200) == burst, statuses
        assert statuses.count(429) == 3 * burst, statuses
