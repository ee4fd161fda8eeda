"""Admission (``service.submission``): the four ways a job comes into existence — a single
submission, a batch, a schedule's trigger and a pipeline's next step — behave the same.

Against the real job store on SQLite and PostgreSQL, the real HTTP routes (TestClient), the
real filesystem broker transport for a working broker and a Redis URL on a closed port for
one that is down, the real reaper, and the worker's own follow-up function:

* broker down: every path keeps its job queued with a warning event, marked for the reaper's
  next round, and the reaper sends all of them once the broker answers; broker up: every path
  sends exactly one message and no warning;
* the tenant's concurrency limit holds on every path (429 / ``skipped_limit``), a pipeline's
  next step excepted by design, and under concurrent submissions on both backends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.auth import Principal, create_api_key
from service.main import create_app
from service.models import Job
from service.queue import make_celery
from service.reaper import Reaper
from service.stores.events import list_events
from service.stores.job_admission import count_active_jobs
from service.stores.job_lifecycle import claim_job, finish_job
from service.stores.job_reads import get_job
from service.submission import LimitExceeded, submit_job
from shortened.config import Settings
from tests.e2e_service import free_port
from tests.e2e_service import prune_spec as spec
from worker.followups import queue_followups

REPO = Path(__file__).resolve().parents[2]


def make_settings(
    tmp_path: Path, database_url: str, broker_url: str | None, **overrides
) -> Settings:
    values: dict = {
        "data_dir": tmp_path / "var",
        "database_url": database_url,
        "broker_url": broker_url,
        "auth_required": True,
        "allowed_local_roots": [REPO],
        # The tests drive the reaper themselves; no background loop may interfere.
        "reaper_interval_s": 0,
        "scheduler_interval_s": 0,
        "webhook_interval_s": 0,
    }
    return Settings(**{**values, **overrides})


def broker_messages(settings: Settings) -> int:
    return len(list((settings.data_dir / "broker" / "queue").glob("*.msg")))


@dataclass
class Api:
    client: TestClient
    headers: dict[str, str]

    @property
    def settings(self) -> Settings:
        return self.client.app.state.settings

    def sessions(self):
        return self.client.app.state.sessionmaker()

    def post(self, path: str, body: dict | None = None):
        return self.client.post(path, json=body, headers=self.headers)

    def submit(self, **overrides) -> str:
        response = self.post("/jobs/prune", spec(**overrides))
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def batch(self) -> str:
        body = {"kind": "prune", "base": spec(), "grid": {"num_blocks": [1]}}
        response = self.post("/jobs/batch", body)
        assert response.status_code == 202, response.text
        [job_id] = response.json()["job_ids"]
        return job_id

    def schedule(self) -> str:
        response = self.post("/schedules", {"cron": "0 3 * * *", "template": spec()})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def succeed(self, job_id: str) -> None:
        """What a worker records for a job that ran: claimed, then succeeded."""
        with self.sessions() as session:
            assert claim_job(session, job_id, "test-worker") is not None
            assert finish_job(session, job_id, "succeeded", message="succeeded")

    def followups(self, parent_id: str) -> list[str]:
        # The worker's own function, sending with the API's Celery app (the same broker).
        return queue_followups(
            self.client.app.state.sessionmaker,
            parent_id,
            self.settings,
            self.client.app.state.celery,
        )


@pytest.fixture
def api_for(tmp_path: Path, database_url: str):
    clients: list[TestClient] = []

    def start(broker_url: str | None, **overrides) -> Api:
        settings = make_settings(tmp_path, database_url, broker_url, **overrides)
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        with client.app.state.sessionmaker() as session:
            key = create_api_key(session, "acme")[1]
        return Api(client, {"Authorization": f"Bearer {key}"})

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def admit_on_every_path(api: Api) -> dict[str, str]:
    """One job through each admission path; their ids by path."""
    jobs = {"single": api.submit(), "batch": api.batch()}
    triggered = api.post(f"/schedules/{api.schedule()}/trigger")
    assert triggered.status_code == 202, triggered.text
    jobs["schedule"] = triggered.json()["job_id"]
    parent = api.submit(eval={"perplexity": {"max_windows": 1}})
    api.succeed(parent)
    [jobs["followup"]] = api.followups(parent)
    return jobs


@pytest.mark.parametrize("broker", ["down", "up"])
def test_every_path_has_the_same_broker_outcome(api_for, broker: str):
    down_url = f"redis://127.0.0.1:{free_port()}/0"
    api = api_for(down_url if broker == "down" else None)
    jobs = admit_on_every_path(api)

    with api.sessions() as session:
        for path, job_id in jobs.items():
            job = session.get(Job, job_id)
            assert job is not None and job.status == "queued", path
            # Down: marked for the reaper's next round rather than after its backoff.
            assert (job.dispatched_at is None) == (broker == "down"), path
            warnings = [e.data for e in list_events(session, job_id) if e.type == "warning"]
            assert warnings == ([{"reason": "broker_unavailable"}] if broker == "down" else []), (
                path
            )

    # The broker answers (again): the reaper sends what was not sent, and only that.
    working = api.settings.model_copy(update={"broker_url": None})
    before = broker_messages(working)
    report = Reaper(working, api.client.app.state.sessionmaker, make_celery(working)).run_once()
    assert report.send_errors == 0
    if broker == "down":
        assert before == 0
        assert sorted(report.redispatched) == sorted(jobs.values())
    else:
        # One message per job on every path (the pipeline's root had one too).
        assert before == len(jobs) + 1
        assert report.redispatched == []
    assert broker_messages(working) == len(jobs) + (0 if broker == "down" else 1)


def test_the_concurrency_limit_holds_on_every_path(api_for):
    api = api_for(None, tenant_limits={"acme": {"max_concurrent_jobs": 2}})
    schedule_id = api.schedule()
    parent = api.submit(eval={"perplexity": {"max_windows": 1}})
    api.submit()  # 2 of 2

    refused = api.post("/jobs/prune", spec())
    assert refused.status_code == 429 and refused.json()["code"] == "too_many_jobs"
    assert "limit 2" in refused.json()["detail"] and refused.headers["retry-after"]
    batch = api.post("/jobs/batch", {"kind": "prune", "base": spec(), "grid": {"num_blocks": [1]}})
    assert batch.status_code == 429 and batch.json()["code"] == "too_many_jobs"
    trigger = api.post(f"/schedules/{schedule_id}/trigger")
    assert trigger.status_code == 429 and trigger.json()["code"] == "too_many_jobs"
    [run] = api.client.get(f"/schedules/{schedule_id}", headers=api.headers).json()["runs"]
    assert run["outcome"] == "skipped_limit" and "limit 2" in run["message"]

    # The pipeline's root finishes (1 of 2), a new job takes its place (2 of 2): the root's
    # next step is created anyway, since it continues work admitted already.
    api.succeed(parent)
    api.submit()
    [child] = api.followups(parent)
    with api.sessions() as session:
        assert count_active_jobs(session, "acme") == 3
        assert get_job(session, child) is not None
    assert api.post("/jobs/prune", spec()).status_code == 429


def test_concurrent_submissions_never_pass_the_limit(api_for):
    api = api_for(None, tenant_limits={"race": {"max_concurrent_jobs": 2}})
    principal = Principal(tenant="race", role="member")
    contenders = 6
    start = threading.Barrier(contenders)
    outcomes: list[str] = []

    def submit() -> None:
        with api.sessions() as session:
            start.wait()
            try:
                submit_job(
                    session,
                    api.settings,
                    api.client.app.state.celery,
                    tenant="race",
                    kind="prune",
                    spec=spec(),
                    principal=principal,
                )
            except LimitExceeded:
                outcomes.append("refused")
            else:
                outcomes.append("created")

    threads = [threading.Thread(target=submit) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(outcomes) == ["created"] * 2 + ["refused"] * (contenders - 2)
    with api.sessions() as session:
        assert count_active_jobs(session, "race") == 2
