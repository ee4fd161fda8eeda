"""The worker task's logic in-process, against a real SQLite job store and local store.

(The Celery wiring itself is exercised with a real worker in test_service_e2e.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.db import make_engine, make_sessionmaker, upgrade_database
from service.stores.events import list_events
from service.stores.job_admission import create_job
from service.stores.job_lifecycle import request_cancel
from service.stores.job_reads import get_job
from shortened.config import Settings
from worker.tasks import execute_job

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "var")
    upgrade_database(settings)
    return settings


@pytest.fixture
def sessions(settings: Settings):
    engine = make_engine(settings.resolved_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def events(sessions, job_id: str):
    with sessions() as session:
        return [(e.type, e.message, e.data) for e in list_events(session, job_id)]


def test_worker_parent_process_never_imports_torch(tmp_path: Path):
    """CUDA must be initialised only in the forked child that runs a job."""
    env = {**os.environ, "SHORTENED_DATA_DIR": str(tmp_path)}
    code = (
        "import sys, worker.celery_app as c, worker.tasks; c.app.loader.import_default_modules(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False", out.stderr


def test_unexpected_error_is_internal_error_with_the_traceback_in_the_log_only(
    settings: Settings, sessions, caplog: pytest.LogCaptureFixture
):
    with sessions() as session:
        # A spec the current PruneSpec rejects (e.g. written by an older release).
        job_id = create_job(session, "prune", {"model": "m", "num_blocks": 1}).id
    with caplog.at_level("ERROR", logger="worker.run"):
        assert execute_job(job_id, settings) == "failed"
    with sessions() as session:
        job = get_job(session, job_id)
        assert job.status == "failed" and job.error_code == "internal_error"
        assert "ValidationError" in job.error_message and job.attempts == 1
        # pydantic's message links its versioned docs: not shown to the tenant.
        assert "errors.pydantic.dev" not in job.error_message
    # The traceback is the operators': in the server log with the job id, not in the events.
    (record,) = [r for r in caplog.records if job_id in r.getMessage()]
    assert record.exc_info is not None
    for _type, message, data in events(sessions, job_id):
        assert "Traceback" not in message and "Traceback" not in str(data)
    assert list((settings.data_dir / "tmp").iterdir()) == []  # temp dir removed


def test_unsupported_kind_fails_cleanly(settings: Settings, sessions):
    with sessions() as session:
        job_id = create_job(session, "distill", {}).id
    assert execute_job(job_id, settings) == "failed"
    with sessions() as session:
        assert get_job(session, job_id).error_code == "unsupported_kind"


def test_a_job_runs_at_most_once(settings: Settings, sessions):
    with sessions() as session:
        job_id = create_job(session, "distill", {}).id
    assert execute_job(job_id, settings) == "failed"
    before = events(sessions, job_id)
    assert execute_job(job_id, settings) is None  # redelivered message: no-op
    assert execute_job("0" * 32, settings) is None  # unknown id: no-op
    assert events(sessions, job_id) == before
    with sessions() as session:
        assert get_job(session, job_id).attempts == 1


def test_cancelled_before_start_is_never_run(settings: Settings, sessions):
    with sessions() as session:
        job_id = create_job(session, "prune", {}).id
        assert request_cancel(session, job_id).immediate
    assert execute_job(job_id, settings) is None
    with sessions() as session:
        job = get_job(session, job_id)
        assert job.status == "cancelled" and job.attempts == 0 and job.started_at is None
