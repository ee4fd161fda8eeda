"""OpenTelemetry: one trace from POST /jobs/prune through the Celery message to the task and
the engine's stages, collected with an in-memory exporter. The API runs in-process
(TestClient), the message goes through the embedded filesystem broker, and an in-process
Celery worker consumes it, so the trace context really travels in the message headers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e_service import REPO, prune_spec


@pytest.fixture
def spans():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing.configure("test", provider)
    yield exporter
    exporter.clear()


def test_one_trace_links_the_request_the_task_and_the_engine_stages(
    spans, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread
):
    from celery.contrib.testing.worker import start_worker
    from fastapi.testclient import TestClient
    from opentelemetry.trace import SpanKind

    import worker.celery_app
    from service.main import create_app
    from service.tracing import JOB_ID_ATTRIBUTE
    from shortened.config import get_settings

    # The worker's Celery app and execute_job read the settings from the environment.
    monkeypatch.setenv("SHORTENED_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SHORTENED_ALLOWED_LOCAL_ROOTS", f'["{REPO}"]')
    monkeypatch.setenv("SHORTENED_SCORE_CACHE", "false")
    for name in ("REAPER", "SCHEDULER", "WEBHOOK"):
        monkeypatch.setenv(f"SHORTENED_{name}_INTERVAL_S", "0")
    get_settings.cache_clear()
    monkeypatch.setattr(worker.celery_app, "_app", None)
    settings = get_settings()
    celery = worker.celery_app.app
    import worker.tasks  # noqa: F401  (registers the task on that app)

    with TestClient(create_app(settings)) as api:
        response = api.post("/jobs/prune", json=prune_spec())
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        with start_worker(celery, pool="solo", perform_ping_check=False, queues=[settings.queue]):
            deadline = time.monotonic() + 300
            while api.get(f"/jobs/{job_id}").json()["status"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, "the job did not finish"
                time.sleep(0.5)
        assert api.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
    get_settings.cache_clear()

    finished = spans.get_finished_spans()
    (request,) = [s for s in finished if s.name == "POST /jobs/prune" and s.kind == SpanKind.SERVER]
    (publish,) = [s for s in finished if s.kind == SpanKind.PRODUCER]
    (task,) = [s for s in finished if s.kind == SpanKind.CONSUMER]
    stages = [s for s in finished if s.name.startswith("stage ")]

    trace_id = request.context.trace_id
    assert {s.context.trace_id for s in [publish, task, *stages]} == {trace_id}
    # Request -> publish (in the request) -> task (from the message headers) -> stages.
    assert publish.parent is not None and task.parent is not None
    assert publish.parent.span_id in {
        s.context.span_id for s in finished if s.context.trace_id == trace_id
    }
    assert task.parent.span_id == publish.context.span_id
    assert {s.parent.span_id for s in stages} == {task.context.span_id}
    assert [s.name for s in sorted(stages, key=lambda s: s.start_time)][:6] == [
        "stage loading",
        "stage calibration",
        "stage scoring",
        "stage quality_gate",
        "stage pruning",
        "stage saving",
    ]
    for span in [request, task, *stages]:
        assert span.attributes[JOB_ID_ATTRIBUTE] == job_id, span.name
    assert stages[-1].attributes["shortened.job_status"] == "succeeded"


def test_tracing_and_tracking_off_import_nothing(tmp_path: Path):
    """Without OTEL_EXPORTER_OTLP_ENDPOINT and an MLflow URI, neither the API nor a job
    imports the OpenTelemetry SDK or mlflow."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SHORTENED_MLFLOW"))}
    env["SHORTENED_DATA_DIR"] = str(tmp_path)
    code = (
        "import sys\n"
        "from service.main import create_app\n"
        "from shortened.config import Settings\n"
        "from worker.tasks import execute_job\n"
        "from service.db import upgrade_database, make_engine, make_sessionmaker\n"
        "from service.stores.job_admission import create_job\n"
        f"s = Settings(data_dir={str(tmp_path)!r}); upgrade_database(s); create_app(s)\n"
        "with make_sessionmaker(make_engine(s.resolved_database_url))() as session:\n"
        "    job_id = create_job(session, 'distill', {}).id\n"
        "execute_job(job_id, s)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('mlflow', 'opentelemetry.sdk',"
        " 'opentelemetry.instrumentation'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
