"""Observability: the API's and the worker's Prometheus /metrics, and the worker's JSON logs.

The API is the real app (``create_app``) over real HTTP requests (TestClient) against
PostgreSQL and a real Redis broker; the worker is a real Celery worker subprocess (prefork,
a fresh child per job) serving its multiprocess metrics from its main process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.main import create_app
from shortened.config import Settings
from tests.e2e_service import (
    REPO,
    base_env,
    free_port,
    prune_spec,
    redis_namespace,
    start_worker,
    wait_until,
)

pytestmark = pytest.mark.e2e

ENGINE_STAGES = ["loading", "calibration", "scoring", "pruning", "saving", "publishing"]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a Prometheus text exposition."""
    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text_or_samples, name: str, **labels: str) -> float | None:
    parsed = samples(text_or_samples) if isinstance(text_or_samples, str) else text_or_samples
    return parsed.get((name, frozenset(labels.items())))


def api_settings(tmp: Path, **overrides) -> Settings:
    return Settings(
        data_dir=tmp,
        artifacts_url=f"file://{tmp.parent / 'artifacts'}",
        allowed_local_roots=[REPO],
        reaper_interval_s=0,  # nothing re-sends or reaps behind the test's back
        **overrides,
    )


@pytest.fixture(scope="module")
def broker():
    with redis_namespace() as (broker_url, queue):
        yield broker_url, queue


@pytest.fixture(scope="module")
def api(postgres_url, broker, tmp_path_factory):
    """The real app over PostgreSQL and Redis; its queue has no worker (messages stay)."""
    broker_url, queue = broker
    settings = api_settings(
        tmp_path_factory.mktemp("api"),
        database_url=postgres_url,
        broker_url=broker_url,
        queue=f"{queue}-idle",
    )
    with TestClient(create_app(settings)) as client:
        yield client


def scrape(client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


# ---------------------------------------------------------------------------- API


def test_requests_are_counted_by_route_template_and_status(api):
    before = samples(scrape(api))
    for job_id in ("a" * 32, "b" * 32, "c" * 32):
        assert api.get(f"/jobs/{job_id}").status_code == 404
    assert api.get("/healthz").status_code == 200
    assert api.get("/no/such/path").status_code == 404
    after = samples(scrape(api))

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    template = {"handler": "/jobs/{job_id}", "method": "GET", "status": "404"}
    assert delta("http_requests_total", **template) == 3
    assert delta("http_request_duration_seconds_count", **template) == 3
    assert delta("http_requests_total", handler="/healthz", method="GET", status="200") == 1
    # An unknown path is grouped under one handler, never its raw path (bounded cardinality).
    assert delta("http_requests_total", handler="none", method="GET", status="404") == 1
    handlers = {dict(labels).get("handler") for _, labels in after}
    assert not any(h and ("aaaa" in h or "/no/such" in h) for h in handlers)
    # Scrapes are not API traffic, and the endpoint is not part of the API's schema.
    assert "/metrics" not in handlers
    assert "/metrics" not in api.get("/openapi.json").json()["paths"]


def test_jobs_by_state_and_redis_queue_depth(api, broker):
    queue = f"{broker[1]}-idle"
    before = samples(scrape(api))
    assert value(before, "shortened_queue_depth", queue=queue) == 0  # nothing sent yet
    queued_before = value(before, "shortened_jobs", status="queued", kind="prune")
    cancelled_before = value(before, "shortened_jobs", status="cancelled", kind="prune")
    assert queued_before is not None and cancelled_before is not None  # zeros are exported

    ids = []
    for _ in range(3):
        response = api.post("/jobs/prune", json=prune_spec())
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    text = scrape(api)
    # No worker consumes this queue: every message is still in Redis.
    assert value(text, "shortened_queue_depth", queue=queue) == 3
    assert value(text, "shortened_jobs", status="queued", kind="prune") == queued_before + 3
    assert value(text, "shortened_metrics_source_up", source="database") == 1
    assert value(text, "shortened_metrics_source_up", source="broker") == 1

    assert api.post(f"/jobs/{ids[0]}/cancel").status_code == 200
    text = scrape(api)
    assert value(text, "shortened_jobs", status="queued", kind="prune") == queued_before + 2
    assert value(text, "shortened_jobs", status="cancelled", kind="prune") == cancelled_before + 1
    assert value(text, "shortened_jobs", status="queued", kind="eval") is not None


def test_filesystem_broker_queue_depth_counts_message_files(tmp_path):
    settings = api_settings(tmp_path / "embedded")  # SQLite + filesystem broker
    with TestClient(create_app(settings)) as client:
        assert value(scrape(client), "shortened_queue_depth", queue=settings.queue) == 0
        for _ in range(2):
            assert client.post("/jobs/prune", json=prune_spec()).status_code == 202
        text = scrape(client)
    assert value(text, "shortened_queue_depth", queue=settings.queue) == 2
    assert len(list((settings.data_dir / "broker" / "queue").glob("*.msg"))) == 2
    assert value(text, "shortened_jobs", status="queued", kind="prune") == 2


def test_metrics_survive_an_unreachable_broker(tmp_path):
    port = free_port()  # nothing listens there
    settings = api_settings(tmp_path / "nobroker", broker_url=f"redis://127.0.0.1:{port}/0")
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        text = scrape(client)
        elapsed = time.monotonic() - started
    assert value(text, "shortened_metrics_source_up", source="broker") == 0
    assert value(text, "shortened_metrics_source_up", source="database") == 1
    assert value(text, "shortened_queue_depth", queue=settings.queue) is None
    assert elapsed < 10


def test_metrics_need_no_key_where_the_api_does(tmp_path):
    settings = api_settings(tmp_path / "auth", auth_required=True)
    with TestClient(create_app(settings)) as client:
        assert client.get("/jobs").status_code == 401
        assert client.get("/metrics").status_code == 200


# ---------------------------------------------------------------------------- worker


@pytest.fixture(scope="module")
def worker_run(postgres_url, broker, tmp_path_factory):
    """A real worker with its metrics port, and one tiny prune job it has run."""
    broker_url, queue = broker
    root = tmp_path_factory.mktemp("worker")
    metrics_port = free_port()
    env = base_env(
        {
            "SHORTENED_DATABASE_URL": postgres_url,
            "SHORTENED_BROKER_URL": broker_url,
            "SHORTENED_QUEUE": queue,
            "SHORTENED_DATA_DIR": str(root / "data"),
            "SHORTENED_ARTIFACTS_URL": f"file://{root / 'artifacts'}",
            "SHORTENED_WORKER_METRICS_PORT": str(metrics_port),
        }
    )
    log_path = root / "worker.log"
    worker = start_worker(env, queue, log_path)
    try:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        idle = httpx.get(url, timeout=10)
        settings = api_settings(
            root / "api",
            database_url=postgres_url,
            broker_url=broker_url,
            queue=queue,
        )
        with TestClient(create_app(settings)) as client:
            response = client.post("/jobs/prune", json=prune_spec())
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]

            def finished():
                job = client.get(f"/jobs/{job_id}").json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            job = wait_until(finished, 300, f"job {job_id}", worker, interval=0.25)
        assert job["status"] == "succeeded", job
        # The child that ran the job writes its metrics before it exits; the main process
        # serves them from then on.
        text = wait_until(
            lambda: (
                (t := httpx.get(url, timeout=10).text)
                and value(
                    t, "shortened_worker_jobs_finished_total", kind="prune", outcome="succeeded"
                )
                and t
            ),
            30,
            "the worker's job metrics",
            worker,
        )
        yield {
            "job": job,
            "idle": idle,
            "metrics": text,
            "log_path": log_path,
            "data_dir": root / "data",
            "worker": worker,
        }
    finally:
        worker.stop(timeout=60)


def test_worker_serves_job_and_stage_metrics(worker_run):
    idle = worker_run["idle"]
    assert idle.status_code == 200  # served once the worker is ready, before any job
    for kind in ("prune", "retrain", "eval"):  # zeros from the start, for rate()/absent()
        assert value(idle.text, "shortened_worker_jobs_started_total", kind=kind) == 0
    assert (
        value(idle.text, "shortened_worker_jobs_finished_total", kind="prune", outcome="failed")
        == 0
    )
    text, job = worker_run["metrics"], worker_run["job"]
    labels = {"kind": "prune", "outcome": "succeeded"}
    assert value(text, "shortened_worker_job_duration_seconds_count", **labels) == 1
    assert value(text, "shortened_worker_jobs_started_total", kind="prune") == 1
    assert value(text, "shortened_worker_jobs_finished_total", **labels) == 1
    duration = value(text, "shortened_worker_job_duration_seconds_sum", **labels)
    assert duration is not None and duration > 0

    stage_total = 0.0
    for stage in ENGINE_STAGES:
        count = value(
            text, "shortened_worker_stage_duration_seconds_count", kind="prune", stage=stage
        )
        assert count == 1, (stage, count)
        stage_total += value(
            text, "shortened_worker_stage_duration_seconds_sum", kind="prune", stage=stage
        )
    # The stages are consecutive parts of the job: together no longer than the job.
    assert 0 < stage_total <= duration + 1e-6
    scoring = value(
        text, "shortened_worker_stage_duration_seconds_sum", kind="prune", stage="scoring"
    )
    engine_scoring = job["result"]["timings"]["scoring_s"]
    assert scoring == pytest.approx(engine_scoring, abs=1.0)
    # A CPU job never initialises CUDA: no GPU memory series.
    assert "shortened_worker_gpu_memory_peak_bytes{" not in text


def test_worker_metrics_directory_is_the_workers_own(worker_run):
    dirs = list(
        (worker_run["data_dir"] / "metrics").glob(f"worker-{worker_run['worker'].popen.pid}-*")
    )
    assert len(dirs) == 1
    # The pool child wrote its values there (one file per process and metric type).
    assert any(p.name.startswith("histogram_") for p in dirs[0].glob("*.db"))


def test_worker_logs_are_json_with_the_job_id(worker_run):
    job_id = worker_run["job"]["id"]
    records = []
    for line in worker_run["log_path"].read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))  # every log line is one JSON object
    assert records, "no JSON log lines"
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(" ready." in r["message"] for r in records)  # Celery's own lines too
    assert any(r["message"].startswith("worker metrics on http://") for r in records)
    ours = [r for r in records if r.get("job_id") == job_id]
    loggers = {r["logger"] for r in ours}
    # The engine's summary line, logged deep inside the job, carries the job id.
    assert "shortened.engine.prune" in loggers, [r["message"] for r in ours]
    engine_lines = [r for r in records if r["logger"].startswith("shortened.engine")]
    assert engine_lines and all(r.get("job_id") == job_id for r in engine_lines)
    # Outside a job (worker start-up) there is no job id.
    assert any(r.get("job_id") is None for r in records)
