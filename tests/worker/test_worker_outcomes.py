"""What the worker records at the end of a job: a succeeded job reads as finished, outputs the
store refuses fail with storage_error, and a retry that fails removes what the lost attempt
had uploaded. The real task code (execute_job) and job store, on SQLite and PostgreSQL."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import pytest

from service.stores.job_lifecycle import claim_job
from shortened.config import Settings
from shortened.engine.errors import DataError
from shortened.engine.progress import Progress
from shortened.storage import open_store
from tests.worker.test_reliability_jobs import (  # noqa: F401  (fixtures)
    as_api,
    expire_lease,
    job_row,
    new_job,
    reaper,
    sessions,
    settings,
    stand_in,
    write_output,
)
from worker import tasks


def test_a_succeeded_job_reads_as_done(sessions, settings, stand_in):  # noqa: F811
    def run(spec, output_dir, reporter, store, settings):
        reporter(Progress("scoring", 3, 12, "blocks"))  # last report before the end
        write_output(output_dir)
        return {}

    stand_in(run)
    job_id = new_job(sessions)
    assert tasks.execute_job(job_id, settings) == "succeeded"
    job = as_api(sessions, job_id)
    assert job["stage"] == "done"
    assert job["progress"]["done"] == job["progress"]["total"] > 0
    assert job["progress"]["fraction"] == 1.0


@pytest.fixture
def pg_settings(postgres_url: str, tmp_path: Path) -> Settings:
    # PostgreSQL only: the file-size limit below would also stop SQLite's own writes.
    return Settings(data_dir=tmp_path / "var", database_url=postgres_url)


def test_an_upload_the_store_refuses_fails_with_storage_error(pg_settings, stand_in):  # noqa: F811
    from service.db import make_engine, make_sessionmaker

    engine = make_engine(pg_settings.resolved_database_url)
    pg_sessions = make_sessionmaker(engine)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def run(spec, output_dir, reporter, store, _settings):
        output_dir.mkdir(parents=True)
        (output_dir / "model.safetensors").write_bytes(b"\0" * 256_000)
        # From here on, a file may not grow past 64 kB: the kernel refuses the upload's
        # write with EFBIG, as a full disk refuses it with ENOSPC.
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, limit[1]))
        return {}

    stand_in(run)
    job_id = new_job(pg_sessions)
    try:
        outcome = tasks.execute_job(job_id, pg_settings)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    try:
        assert outcome == "failed"
        job = as_api(pg_sessions, job_id)
        assert job["error"]["code"] == "storage_error", job["error"]
        assert job["error"]["message"] == "publishing the outputs failed: File too large"
        assert open_store(pg_settings.resolved_artifacts_url).list(f"jobs/{job_id}") == []
    finally:
        engine.dispose()


def test_a_retry_that_fails_removes_the_lost_attempts_upload(
    sessions,  # noqa: F811
    settings,  # noqa: F811
    stand_in,  # noqa: F811
    reaper,  # noqa: F811
):
    job_id = new_job(sessions)
    with sessions() as session:
        assert claim_job(session, job_id, "lost-host:1") is not None
    # What the lost attempt uploaded before it died: objects, and no manifest.
    store = open_store(settings.resolved_artifacts_url)
    store.put_bytes(f"jobs/{job_id}/model.safetensors", b"\0" * 100)
    expire_lease(sessions, job_id)
    assert reaper.run_once().requeued == [job_id]

    def run(spec, output_dir, reporter, store, settings):
        raise DataError("the training data is empty")

    stand_in(run)
    assert tasks.execute_job(job_id, settings) == "failed"
    assert job_row(sessions, job_id).error_code == "bad_data"
    assert store.list(f"jobs/{job_id}") == []
