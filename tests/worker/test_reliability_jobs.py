"""Reliability in the job lifecycle, in-process: leases and the reaper, attempt fencing,
re-dispatch, time limits, publishing checks, temp-file hygiene, and the engine's resume hook.

Against a real SQLite and PostgreSQL job store and the real filesystem broker transport; the
worker's ``execute_job`` runs in this process (the Celery wiring with real worker processes
and Redis is in test_reliability_e2e.py). Engine calls are stand-ins that report progress
like the engine does, except in the resume tests, which run the real engine on a tiny model.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import update

from service.db import make_engine, make_sessionmaker
from service.models import Job, utcnow
from service.reaper import Reaper
from service.stores.events import list_events
from service.stores.job_admission import create_job
from service.stores.job_lifecycle import (
    claim_job,
    finish_job,
    record_progress,
    renew_lease,
    request_cancel,
)
from service.stores.job_reads import get_job, list_attempts
from service.stores.job_recovery import redispatch_backoff_s
from shortened.config import Settings
from shortened.engine.errors import Cancelled
from shortened.engine.progress import Progress
from shortened.kinds import JOB_KINDS, JobKind
from shortened.specs import CalibrationSpec, PruneSpec
from shortened.storage import open_store, scratch_prefix
from tests import reliability_figures as figures
from tests.helpers import save_tiny, tiny_model
from worker import tasks
from worker.celery_app import make_celery
from worker.reporter import JobReporter


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        lease_ttl_s=2.0,
        heartbeat_interval_s=0.2,
        max_attempts=2,
        redispatch_after_s=1.0,
    )


@pytest.fixture
def sessions(settings: Settings):
    engine = make_engine(settings.resolved_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def reaper(settings: Settings, sessions) -> Reaper:
    return Reaper(settings, sessions, make_celery(settings))


def messages(settings: Settings) -> int:
    folder = settings.data_dir / "broker" / "queue"
    return len(list(folder.glob("*.msg"))) if folder.is_dir() else 0


def new_job(sessions, kind: str = "stand-in", spec: dict | None = None) -> str:
    with sessions() as session:
        return create_job(session, kind, spec or {}).id


def job_row(sessions, job_id: str) -> Job:
    with sessions() as session:
        job = get_job(session, job_id)
        assert job is not None
        return job


def expire_lease(sessions, job_id: str) -> None:
    """What time does to a dead worker's lease, without waiting for it."""
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()


def history(sessions, job_id: str) -> list[dict]:
    with sessions() as session:
        return [
            {
                "attempt": a.attempt,
                "worker": a.worker,
                "started_at": a.started_at,
                "ended_at": a.ended_at,
                "outcome": a.outcome,
            }
            for a in list_attempts(session, job_id)
        ]


def as_api(sessions, job_id: str) -> dict:
    from service.schemas import JobOut

    with sessions() as session:
        return JobOut.from_row(get_job(session, job_id)).model_dump()


# ---------------------------------------------------------------------------- the reaper


def test_lost_worker_job_is_requeued_then_fails_on_its_last_attempt(sessions, reaper, settings):
    job_id = new_job(sessions)
    with sessions() as session:
        assert claim_job(session, job_id, "w1", lease_ttl_s=60).attempts == 1
    assert reaper.run_once().requeued == []  # lease still valid: nothing to do
    expire_lease(sessions, job_id)
    before = messages(settings)
    report = reaper.run_once()
    assert report.requeued == [job_id] and messages(settings) == before + 1
    job = job_row(sessions, job_id)
    assert job.status == "queued" and job.worker is None and job.lease_expires_at is None

    # The second (last) attempt is lost too: failed with worker_lost, not re-queued again.
    with sessions() as session:
        assert claim_job(session, job_id, "w2").attempts == 2
    expire_lease(sessions, job_id)
    report = reaper.run_once()
    assert report.failed == [job_id] and report.requeued == []
    job = job_row(sessions, job_id)
    assert job.status == "failed" and job.error_code == "worker_lost"
    assert "attempt 2 of 2" in job.error_message and job.finished_at is not None
    attempts = history(sessions, job_id)
    assert [(a["attempt"], a["worker"], a["outcome"]) for a in attempts] == [
        (1, "w1", "worker_lost"),
        (2, "w2", "worker_lost"),
    ]
    assert not figures.attempts_overlap(attempts)
    with sessions() as session:
        statuses = [
            e.data.get("status") for e in list_events(session, job_id) if e.type == "status"
        ]
    assert statuses == ["queued", "running", "queued", "running", "failed"]
    figures.record_jobs([as_api(sessions, job_id)])
    figures.fault("lease_expired", 2)


def test_a_lost_job_that_was_cancelled_or_past_its_deadline_is_not_requeued(sessions, reaper):
    cancelled, timed_out = new_job(sessions), new_job(sessions)
    with sessions() as session:
        claim_job(session, cancelled, "w1")
        request_cancel(session, cancelled)
        claim_job(session, timed_out, "w1", time_limit_s=0.001)
    time.sleep(0.01)
    expire_lease(sessions, cancelled)
    expire_lease(sessions, timed_out)
    report = reaper.run_once()
    assert report.cancelled == [cancelled] and report.failed == [timed_out]
    assert job_row(sessions, cancelled).status == "cancelled"
    job = job_row(sessions, timed_out)
    assert job.status == "failed" and job.error_code == "timeout"
    assert history(sessions, timed_out)[0]["outcome"] == "timeout"
    figures.record_jobs([as_api(sessions, cancelled), as_api(sessions, timed_out)])
    figures.fault("lease_expired", 2)


def test_a_stalled_attempt_is_fenced_off_after_the_job_is_requeued(sessions, reaper, settings):
    """The worker of attempt 1 is alive but lost its lease (stalled past the TTL): once the
    job is re-queued and claimed again it can neither report progress nor finish the job."""
    job_id = new_job(sessions)
    with sessions() as session:
        claim_job(session, job_id, "stalled")
    expire_lease(sessions, job_id)
    assert reaper.run_once().requeued == [job_id]
    with sessions() as session:
        assert claim_job(session, job_id, "fresh").attempts == 2
        # attempt 1 wakes up:
        assert not renew_lease(session, job_id, 1, 60)
        assert record_progress(
            session, job_id, stage="x", done=1, total=2, unit="blocks", attempt=1
        )
        assert not finish_job(session, job_id, "succeeded", message="late", attempt=1)
        # attempt 2 is unaffected:
        assert renew_lease(session, job_id, 2, 60)
        assert not record_progress(
            session, job_id, stage="x", done=1, total=2, unit="blocks", attempt=2
        )
        assert finish_job(session, job_id, "succeeded", message="ok", attempt=2)
    job = as_api(sessions, job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert [a["outcome"] for a in job["attempt_history"]] == ["worker_lost", "succeeded"]
    assert not figures.attempts_overlap(job["attempt_history"])
    figures.record_jobs([job])
    figures.fault("stalled_worker", 1)


def test_concurrent_reapers_act_once(sessions, settings):
    """Several API replicas (and the CLI) may reap at the same time: each expired attempt is
    re-queued exactly once and each stale queued job re-sent once per round."""
    lost = [new_job(sessions) for _ in range(6)]
    with sessions() as session:
        for job_id in lost:
            claim_job(session, job_id, "dead")
    for job_id in lost:
        expire_lease(sessions, job_id)
    reapers = [Reaper(settings, sessions, make_celery(settings)) for _ in range(4)]
    reports = []
    barrier = threading.Barrier(len(reapers))

    def run(r: Reaper) -> None:
        barrier.wait()
        reports.append(r.run_once())

    threads = [threading.Thread(target=run, args=(r,)) for r in reapers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    requeued = [job_id for report in reports for job_id in report.requeued]
    assert sorted(requeued) == sorted(lost)  # each exactly once
    for job_id in lost:
        with sessions() as session:
            events = [e for e in list_events(session, job_id) if "re-queued" in e.message]
        assert len(events) == 1
        assert [a["outcome"] for a in history(sessions, job_id)] == ["worker_lost"]
    figures.fault("lease_expired", len(lost))


def test_queued_jobs_whose_message_was_lost_are_resent_with_backoff(sessions, reaper, settings):
    job_id = new_job(sessions)
    claimed = new_job(sessions)
    with sessions() as session:
        claim_job(session, claimed, "w")
    assert reaper.run_once().redispatched == []  # not stale yet
    time.sleep(1.1)
    before = messages(settings)
    report = reaper.run_once()
    assert report.redispatched == [job_id]  # the running one is left alone
    assert messages(settings) == before + 1
    assert reaper.run_once().redispatched == []  # backoff: next after 2 s, then 4 s, ...
    assert redispatch_backoff_s(120, 1) == 120 and redispatch_backoff_s(120, 9) == 960
    # However many copies of the message arrive, the job runs once.
    results = [tasks.execute_job(job_id, settings) for _ in range(3)]
    assert results.count("failed") == 1 and results.count(None) == 2  # stand-in kind: failed
    assert job_row(sessions, job_id).attempts == 1
    figures.count(duplicates_ignored=2)
    figures.fault("lost_message", 1)


def test_a_message_that_cannot_be_sent_is_retried_at_the_next_round(sessions, settings):
    from tests.e2e_service import free_port

    job_id = new_job(sessions)
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(dispatched_at=utcnow() - timedelta(seconds=10))
        )
        session.commit()
    broker_down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    report = Reaper(settings, sessions, make_celery(broker_down)).run_once()
    assert report.redispatched == [job_id] and report.send_errors == 1
    assert job_row(sessions, job_id).dispatched_at is None
    # The broker is back: sent at the next round, without waiting for the backoff.
    before = messages(settings)
    assert Reaper(settings, sessions, make_celery(settings)).run_once().redispatched == [job_id]
    assert messages(settings) == before + 1
    figures.fault("broker_down_at_redispatch", 1)


# ---------------------------------------------------------------------------- the worker


class StandInSpec(BaseModel):
    """Any spec: the stand-in kind's engine call reads what its test gives it."""

    model_config = ConfigDict(extra="allow")


@pytest.fixture
def stand_in(monkeypatch):
    """Install kind 'stand-in' (one row of the job-kind table) whose engine call the test
    scripts: ``run(spec, output_dir, reporter, store, settings)``."""
    calls: dict = {}

    def install(run):
        def engine(spec, output_dir, *, progress, store, settings):
            return run(spec.model_dump(), output_dir, progress, store, settings)

        row = JobKind(
            name="stand-in",
            spec=StandInSpec,
            summary="A test's stand-in",
            engine=engine,
            resources=("settings",),
        )
        monkeypatch.setitem(JOB_KINDS, "stand-in", row)
        return calls

    return install


def write_output(output_dir: Path) -> None:
    output_dir.mkdir(parents=True)
    (output_dir / "config.json").write_text("{}")
    (output_dir / "model.safetensors").write_bytes(b"\0" * 1000)


def test_heartbeat_keeps_the_lease_of_a_long_job(sessions, settings, stand_in, reaper):
    seen = []

    def run(spec, output_dir, reporter, store, settings):
        for block in range(1, 13):  # ~3 s, longer than the lease TTL
            time.sleep(0.25)
            reporter(Progress("scoring", block, 12, "blocks"))
            seen.append(job_row(sessions, job_id).lease_expires_at)
            assert reaper.run_once().requeued == []  # a reaper running meanwhile: no effect
        write_output(output_dir)
        return {"ok": True}

    stand_in(run)
    job_id = new_job(sessions)
    assert tasks.execute_job(job_id, settings) == "succeeded"
    assert len(set(seen)) >= 4  # renewed along the way
    job = as_api(sessions, job_id)
    assert job["attempts"] == 1 and [a["outcome"] for a in job["attempt_history"]] == ["succeeded"]
    figures.record_jobs([job])


def test_a_worker_that_loses_its_lease_stops_and_records_nothing(
    sessions, settings, stand_in, reaper
):
    def run(spec, output_dir, reporter, store, settings):
        reporter(Progress("scoring", 1, 4, "blocks"))
        # Meanwhile, the job store thinks this worker is dead and re-queues the job.
        expire_lease(sessions, job_id)
        assert reaper.run_once().requeued == [job_id]
        for block in range(2, 5):
            reporter(Progress("scoring", block, 4, "blocks"))
        write_output(output_dir)
        return {}

    stand_in(run)
    job_id = new_job(sessions)
    assert tasks.execute_job(job_id, settings) == "lost"
    job = job_row(sessions, job_id)
    assert job.status == "queued" and job.progress_done == 1  # no write after losing the lease
    store = open_store(settings.resolved_artifacts_url)
    assert store.list(f"jobs/{job_id}") == []
    # The next attempt runs it to the end.
    stand_in(lambda spec, output_dir, reporter, store, settings: write_output(output_dir) or {})
    assert tasks.execute_job(job_id, settings) == "succeeded"
    job = as_api(sessions, job_id)
    assert [a["outcome"] for a in job["attempt_history"]] == ["worker_lost", "succeeded"]
    assert not figures.attempts_overlap(job["attempt_history"])
    figures.record_jobs([job])
    figures.fault("lease_expired", 1)


def test_a_job_over_its_time_limit_fails_with_timeout(sessions, settings, stand_in):
    from celery.exceptions import SoftTimeLimitExceeded

    def slow(spec, output_dir, reporter, store, settings):
        for block in range(1, 1000):
            time.sleep(0.05)
            reporter(Progress("scoring", block, 1000, "blocks"))
        return {}

    def stuck(spec, output_dir, reporter, store, settings):
        raise SoftTimeLimitExceeded()  # Celery's backstop interrupts a job between reports

    results = []
    for run in (slow, stuck):
        stand_in(run)
        job_id = new_job(sessions)
        started = time.monotonic()
        assert (
            tasks.execute_job(job_id, settings.model_copy(update={"job_time_limit_s": 0.5}))
            == "failed"
        )
        assert time.monotonic() - started < 5
        job = as_api(sessions, job_id)
        assert (
            job["error"]["code"] == "timeout" and "time limit of 0.5 s" in job["error"]["message"]
        )
        assert [a["outcome"] for a in job["attempt_history"]] == ["timeout"]
        results.append(job)
    assert list((settings.data_dir / "tmp").iterdir()) == []
    figures.record_jobs(results)
    figures.fault("time_limit", 2)


def test_cancel_while_saving_publishes_nothing(sessions, settings, stand_in):
    def run(spec, output_dir, reporter, store, settings):
        reporter(Progress("saving"))
        write_output(output_dir)
        with sessions() as session:  # the cancel arrives as the checkpoint is written
            request_cancel(session, job_id)
        return {}

    stand_in(run)
    job_id = new_job(sessions)
    assert tasks.execute_job(job_id, settings) == "cancelled"
    store = open_store(settings.resolved_artifacts_url)
    assert store.list(f"jobs/{job_id}") == [] and store.list(scratch_prefix(job_id)) == []
    assert list((settings.data_dir / "tmp").iterdir()) == []
    figures.record_jobs([as_api(sessions, job_id)])
    figures.fault("cancel", 1)


def test_an_incomplete_upload_fails_the_job_and_removes_it(
    sessions, settings, stand_in, monkeypatch
):
    import shortened.storage as storage

    real_publish = storage.publish_directory

    def lossy_publish(store, local_dir, prefix, **kwargs):
        manifest = real_publish(store, local_dir, prefix, **kwargs)
        store.delete(f"{prefix}/model.safetensors")  # an object lost by the store
        return manifest

    monkeypatch.setattr(storage, "publish_directory", lossy_publish)
    stand_in(lambda spec, output_dir, reporter, store, settings: write_output(output_dir) or {})
    job_id = new_job(sessions)
    assert tasks.execute_job(job_id, settings) == "failed"
    job = job_row(sessions, job_id)
    assert job.error_code == "artifact_upload_failed" and "model.safetensors" in job.error_message
    assert job.artifacts is None
    assert open_store(settings.resolved_artifacts_url).list(f"jobs/{job_id}") == []
    figures.record_jobs([as_api(sessions, job_id)])
    figures.fault("lost_upload", 1)


def test_work_dirs_of_dead_workers_are_swept(sessions, settings, stand_in):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    work_root = settings.data_dir / "tmp"
    stale = work_root / f"job-{'a' * 32}-p{dead_pid}-x1"
    alive = work_root / f"job-{'b' * 32}-p1-x2"  # pid 1 is alive: another worker's
    (stale / "output").mkdir(parents=True)
    (stale / "output" / "model.safetensors").write_bytes(b"\0" * 100)
    alive.mkdir(parents=True)
    stand_in(lambda spec, output_dir, reporter, store, settings: write_output(output_dir) or {})
    assert tasks.execute_job(new_job(sessions), settings) == "succeeded"
    assert sorted(p.name for p in work_root.iterdir()) == [alive.name]


# ---------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save_tiny(tiny_model("llama", num_layers=8), root / "model")
    with (root / "cal.jsonl").open("w") as handle:
        for i in range(40):
            text_ = " ".join(["the quick brown fox jumps over a lazy dog"] * (3 + i % 4))
            handle.write(json.dumps({"text": f"{text_} {i}"}) + "\n")
    return root


def prune_spec(root: Path, **overrides) -> PruneSpec:
    calibration = CalibrationSpec(source=str(root / "cal.jsonl"), n_samples=6, seq_len=16)
    return PruneSpec(
        **{
            "model": str(root / "model"),
            "num_blocks": 2,
            "calibration": calibration,
            "score_all_blocks": True,
            "protect_first": 1,
            "protect_last": 1,
            "device": "cpu",
            **overrides,
        }
    )


@pytest.mark.parametrize("criterion", ["ppl", "iterative_ppl"])
def test_a_retried_prune_skips_the_blocks_already_scored(
    tiny_workspace: Path, tmp_path: Path, criterion: str
):
    from shortened.engine.prune import prune_model

    spec = prune_spec(tiny_workspace, criterion=criterion)
    fresh = prune_model(spec, tmp_path / "fresh")

    computed: list[int] = []

    def crash_after(n: int):
        def callback(progress: Progress) -> None:
            if progress.stage == "scoring" and "block" in progress.metrics:
                if not progress.metrics.get("resumed"):
                    computed.append(progress.metrics["block"])
                if len(computed) == n:
                    raise Cancelled("the worker died here")

        return callback

    resume_dir = tmp_path / "resume"
    with pytest.raises(Cancelled):
        prune_model(spec, tmp_path / "attempt1", progress=crash_after(3), resume_dir=resume_dir)
    assert not (tmp_path / "attempt1").exists()
    first = len(computed)
    computed.clear()
    stages: list[str] = []

    def watch(progress: Progress) -> None:
        crash_after(-1)(progress)
        if progress.stage == "scoring" and progress.done == 0:
            stages.append(progress.message)

    report = prune_model(spec, tmp_path / "attempt2", progress=watch, resume_dir=resume_dir)
    total_evaluations = 8 if criterion == "ppl" else 6 + 5  # iterative: 6 candidates, 2 rounds
    assert first == 3 and report["resumed_scores"] == 3
    assert len(computed) == total_evaluations - 3  # only the rest was scored
    assert stages[0] == f"{criterion} (resuming 3 saved block scores)"
    # Exactly the result of an uninterrupted run.
    assert [s is None for s in report["block_scores"]] == [s is None for s in fresh["block_scores"]]
    assert [s for s in report["block_scores"] if s is not None] == pytest.approx(
        [s for s in fresh["block_scores"] if s is not None], rel=1e-6
    )
    assert report["removal_order"] == fresh["removal_order"]

    # Saved scores of other data are not reused.
    other = prune_spec(
        tiny_workspace,
        criterion=criterion,
        calibration=CalibrationSpec(
            source=str(tiny_workspace / "cal.jsonl"), n_samples=6, seq_len=16, seed=7
        ),
    )
    assert prune_model(other, tmp_path / "other", resume_dir=resume_dir)["resumed_scores"] == 0


def test_the_worker_resumes_from_the_scores_the_lost_attempt_saved(
    tiny_workspace, sessions, settings, reaper, monkeypatch
):
    """Attempt 1 scores 3 blocks and loses its lease (its scores are in the artifact store);
    attempt 2, with a clean work directory, scores only the other blocks."""
    spec = prune_spec(tiny_workspace).model_dump(mode="json")
    job_id = new_job(sessions, "prune", spec)
    real_call = JobReporter.__call__
    scored: dict[int, list[int]] = {1: [], 2: []}

    def spy(self, progress):
        block = progress.metrics.get("block")
        if block is not None and not progress.metrics.get("resumed"):
            scored[self.attempt].append(block)
            if self.attempt == 1 and len(scored[1]) == 3:
                expire_lease(sessions, job_id)  # the worker stalls here ...
                assert reaper.run_once().requeued == [job_id]  # ... and the job is re-queued
        return real_call(self, progress)

    monkeypatch.setattr(JobReporter, "__call__", spy)
    assert tasks.execute_job(job_id, settings) == "lost"
    store = open_store(settings.resolved_artifacts_url)
    assert [o.key for o in store.list(scratch_prefix(job_id))] == [
        f"{scratch_prefix(job_id)}/block_scores.partial.json"
    ]
    assert tasks.execute_job(job_id, settings) == "succeeded"
    job = as_api(sessions, job_id)
    assert job["result"]["resumed_scores"] == 3
    assert len(scored[2]) == 8 - 3 and not set(scored[2]) & set(scored[1][:3])
    assert store.list(scratch_prefix(job_id)) == []  # scratch removed with the job's end
    with sessions() as session:
        stages = [e.message for e in list_events(session, job_id) if e.type == "stage"]
    assert "scoring: ppl (resuming 3 saved block scores)" in stages
    figures.record_jobs([job])
    figures.count(resumed_attempts=1)
    figures.fault("lease_expired", 1)
