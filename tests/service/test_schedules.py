"""Schedules: cron expressions with a job template, exactly one job per slot.

* the API (FastAPI TestClient, real PostgreSQL job store, API keys): 422s naming the field,
  tenant scoping, PATCH/DELETE, manual trigger, the concurrency limit at fire time;
* two real ``python -m service.scheduler`` processes on one PostgreSQL database and a real
  Redis broker, racing for per-second slots of three schedules: every slot has exactly one
  run and one job, each job exactly one task message, and both schedulers created some;
* the unique-slot backstop when a scheduler acts on a stale ``next_run_at``, and missed
  slots (scheduler down) coalesced into one job;
* "the newest model under a prefix" against a real S3 server (moto) and a local directory;
* end to end: the API's own scheduler thread creates a tiny prune job that a real Celery
  worker runs to success, and DELETE stops further slots.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import boto3
import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from service.auth import create_api_key
from service.db import upgrade_database
from service.main import create_app
from service.models import Job, Schedule, ScheduleRun, utcnow
from service.scheduler import Scheduler, fire_times
from shortened.config import Settings
from tests.e2e_service import (
    REDIS_HOST,
    REDIS_PORT,
    base_env,
    free_port,
    postgres_database,
    prune_spec,
    redis_namespace,
    s3_bucket,
    start_api,
    start_process,
    start_worker,
    wait_for_job,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
MODEL = str(REPO / "models" / "tiny-llama")
DATA = str(REPO / "data" / "calibration.jsonl")
SECOND = timedelta(seconds=1)


def template(**overrides) -> dict:
    body = {
        "criterion": "ppl",
        "num_blocks": 2,
        "calibration": {"source": DATA, "n_samples": 4},
        "device": "cpu",
        "model": MODEL,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


class Service:
    def __init__(self, client: TestClient, bucket: str, s3_endpoint: str, local_root: Path):
        self.client = client
        self.sessions = client.app.state.sessionmaker
        self.settings: Settings = client.app.state.settings
        self.bucket = bucket
        self.s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        self.local_root = local_root
        self.keys: dict[str, str] = {}
        for tenant, role in [("acme", "member"), ("globex", "member"), ("capped", "member")]:
            with self.sessions() as session:
                self.keys[tenant] = create_api_key(session, tenant, role)[1]

    def headers(self, tenant: str = "acme") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def create(self, tenant: str = "acme", **body) -> dict:
        body.setdefault("cron", "0 3 * * *")
        body.setdefault("template", template())
        response = self.client.post("/schedules", json=body, headers=self.headers(tenant))
        assert response.status_code == 201, response.text
        assert response.headers["location"] == f"/schedules/{response.json()['id']}"
        return response.json()


@pytest.fixture(scope="module")
def service(postgres_url, s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("schedules")
    local_models = root / "local-models"
    local_models.mkdir()
    with s3_bucket(s3_server) as bucket:
        settings = Settings(
            data_dir=root / "var",
            database_url=postgres_url,
            auth_required=True,
            allowed_local_roots=[REPO, local_models],
            allowed_buckets=[bucket],
            s3_endpoint_url=s3_server,
            max_concurrent_jobs=1000,
            tenant_limits={"capped": {"max_concurrent_jobs": 0}},
            reaper_interval_s=0,
            scheduler_interval_s=0,  # the tests drive the schedulers themselves
            min_cron_interval_s=1,  # per-second crons: the tests cannot wait minutes
        )
        with TestClient(create_app(settings)) as client:
            yield Service(client, bucket, s3_server, local_models)


def error_locs(response) -> list[tuple]:
    assert response.status_code == 422, response.text
    return [tuple(e["loc"]) for e in response.json()["detail"]]


# ---------------------------------------------------------------------------- API


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"cron": "not a cron"}, ("body", "cron")),
        ({"cron": "61 * * * *"}, ("body", "cron")),
        ({"cron": "* * * *"}, ("body", "cron")),
        ({"cron": "0 0 30 2 *"}, ("body", "cron")),  # February 30th: never fires
        ({"timezone": "Mars/Olympus_Mons"}, ("body", "timezone")),
        ({"timezone": "../../etc/passwd"}, ("body", "timezone")),
        ({"kind": "distill"}, ("body", "kind")),
        ({"template": template(num_blocks=0)}, ("body", "template", "num_blocks")),
        ({"template": template(bogus=1)}, ("body", "template", "bogus")),
        (
            {"template": template(calibration={"source": DATA, "n_samples": 0})},
            ("body", "template", "calibration", "n_samples"),
        ),
        ({"template": template(model=None)}, ("body", "template", "model")),
        # The source policy, as at submission: outside the allowed roots / buckets.
        ({"template": template(model="/etc")}, ("body", "template", "model")),
        (
            {"template": template(model=None), "model_selector": {"prefix": "s3://other/m/"}},
            ("body", "model_selector", "prefix"),
        ),
        (
            {"template": template(), "model_selector": {"prefix": "s3://other/m/"}},
            ("body", "template", "model"),
        ),
        (
            {"template": template(model=None), "model_selector": {"prefix": "hf://org/x"}},
            ("body", "model_selector", "prefix"),
        ),
        (
            {"template": template(model=None), "model_selector": {"prefix": MODEL, "pick": "x"}},
            ("body", "model_selector", "pick"),
        ),
        ({"kind": "eval"}, ("body", "template", "num_blocks")),  # a prune template: no eval spec
    ],
)
def test_invalid_schedule_is_422_naming_the_field(service: Service, body: dict, loc: tuple):
    body = {"cron": "0 3 * * *", "template": template(), **body}
    response = service.client.post("/schedules", json=body, headers=service.headers())
    assert loc in error_locs(response)


def test_create_get_list_patch_delete_and_tenant_scoping(service: Service):
    client = service.client
    created = service.create(
        name="nightly",
        cron="30 2 * * *",
        timezone="Europe/Paris",
        template=template(
            target_ratio=0.2, num_blocks=None, eval={"perplexity": {"datasets": [DATA]}}
        ),
    )
    assert created["tenant"] == "acme" and created["enabled"] is True
    # Stored as validated, with the spec's defaults (and the pipeline's eval section).
    assert created["template"]["protect_first"] == 4
    assert created["template"]["eval"]["perplexity"]["seq_len"] == 128
    next_run = datetime.fromisoformat(created["next_run_at"])
    assert next_run > utcnow() and next_run.utcoffset() == timedelta(0)
    local = next_run.astimezone(ZoneInfo("Europe/Paris"))
    assert (local.hour, local.minute) in ((2, 30), (3, 0))  # 03:00 on the spring-forward day

    detail = client.get(f"/schedules/{created['id']}", headers=service.headers()).json()
    assert detail["runs"] == [] and len(detail["next_fire_times"]) == 5
    assert detail["next_fire_times"][0] == created["next_run_at"]

    # Another tenant sees nothing and gets the unknown-id answer.
    other = service.headers("globex")
    for method, path in [
        ("GET", f"/schedules/{created['id']}"),
        ("PATCH", f"/schedules/{created['id']}"),
        ("DELETE", f"/schedules/{created['id']}"),
        ("POST", f"/schedules/{created['id']}/trigger"),
    ]:
        response = client.request(method, path, headers=other, json={"enabled": False})
        assert response.status_code == 404, (method, path, response.text)
    assert created["id"] not in [
        s["id"] for s in client.get("/schedules", headers=other).json()["items"]
    ]
    assert created["id"] in [
        s["id"] for s in client.get("/schedules", headers=service.headers()).json()["items"]
    ]
    assert client.get("/schedules").status_code == 401

    # PATCH: validated like a creation; a new cron restarts the slots.
    patch = f"/schedules/{created['id']}"
    assert ("body", "cron") in error_locs(
        client.patch(patch, json={"cron": "x"}, headers=service.headers())
    )
    assert ("body", "template", "num_blocks") in error_locs(
        client.patch(patch, json={"template": template(num_blocks=-1)}, headers=service.headers())
    )
    assert ("body", "enabled") in error_locs(
        client.patch(patch, json={"enabled": None}, headers=service.headers())
    )
    patched = client.patch(
        patch,
        json={"cron": "0 */6 * * *", "timezone": "UTC", "enabled": False},
        headers=service.headers(),
    ).json()
    assert patched["cron"] == "0 */6 * * *" and patched["enabled"] is False
    assert datetime.fromisoformat(patched["next_run_at"]).hour % 6 == 0
    assert client.get(patch, headers=service.headers()).json()["next_fire_times"] == []
    assert [
        s["id"]
        for s in client.get("/schedules?enabled=false", headers=service.headers()).json()["items"]
    ] == [created["id"]]

    assert client.delete(patch, headers=service.headers()).status_code == 204
    assert client.get(patch, headers=service.headers()).status_code == 404
    assert client.delete(patch, headers=service.headers()).status_code == 404


def test_cron_slots_follow_the_time_zone_across_dst():
    # 02:30 Paris: CET (UTC+1) before 29 March 2026, no 02:30 that night (fires at 03:00
    # CEST, the first valid time), CEST (UTC+2) after.
    start = datetime(2026, 3, 28, 1, 30, tzinfo=timezone.utc)
    assert fire_times("30 2 * * *", "Europe/Paris", start, 3) == [
        datetime(2026, 3, 28, 1, 30, tzinfo=timezone.utc),
        datetime(2026, 3, 29, 1, 0, tzinfo=timezone.utc),
        datetime(2026, 3, 30, 0, 30, tzinfo=timezone.utc),
    ]
    # Six fields: seconds first.
    assert fire_times("*/20 * * * * *", "UTC", start, 3) == [
        start,
        start + 20 * SECOND,
        start + 40 * SECOND,
    ]


def test_trigger_creates_a_job_and_the_tenant_limit_skips_it(service: Service):
    client = service.client
    schedule = service.create()
    response = client.post(f"/schedules/{schedule['id']}/trigger", headers=service.headers())
    assert response.status_code == 202, response.text
    run = response.json()
    assert run["outcome"] == "created" and run["scheduler"] == "trigger"
    assert response.headers["location"] == f"/jobs/{run['job_id']}"
    job = client.get(f"/jobs/{run['job_id']}", headers=service.headers()).json()
    assert job["status"] == "queued" and job["tenant"] == "acme" and job["spec"]["model"] == MODEL
    with service.sessions() as session:
        assert session.get(Job, run["job_id"]).schedule_id == schedule["id"]
    # A trigger is outside the cron slots: next_run_at is unchanged.
    detail = client.get(f"/schedules/{schedule['id']}", headers=service.headers()).json()
    assert detail["next_run_at"] == schedule["next_run_at"]
    assert [(r["job_id"], r["job_status"]) for r in detail["runs"]] == [(run["job_id"], "queued")]

    # Tenant "capped" may have no queued job: the run is recorded as skipped_limit, no job.
    capped = service.create("capped")
    response = client.post(f"/schedules/{capped['id']}/trigger", headers=service.headers("capped"))
    assert response.status_code == 429 and response.json()["code"] == "too_many_jobs"
    [skipped] = client.get(f"/schedules/{capped['id']}", headers=service.headers("capped")).json()[
        "runs"
    ]
    assert skipped["outcome"] == "skipped_limit" and skipped["job_id"] is None
    assert "limit 0" in skipped["message"]
    with service.sessions() as session:
        assert session.scalars(select(Job).where(Job.tenant == "capped")).all() == []


# ---------------------------------------------------------------------------- scheduler


def _set_next_run(service: Service, schedule_id: str, when: datetime) -> None:
    with service.sessions() as session:
        session.execute(update(Schedule).where(Schedule.id == schedule_id).values(next_run_at=when))
        session.commit()


def _runs_and_jobs(service: Service, schedule_id: str) -> tuple[list[ScheduleRun], list[Job]]:
    with service.sessions() as session:
        runs = list(
            session.scalars(
                select(ScheduleRun)
                .where(ScheduleRun.schedule_id == schedule_id)
                .order_by(ScheduleRun.slot_at)
            )
        )
        jobs = list(session.scalars(select(Job).where(Job.schedule_id == schedule_id)))
    return runs, jobs


def test_a_slot_is_never_run_twice_even_from_a_stale_next_run_at(service: Service):
    """The backstop under the row lock and compare-and-set: a scheduler that acts on a slot
    another one already ran (here: next_run_at put back) inserts nothing."""
    app = service.client.app
    schedule = service.create(cron="0 0 1 1 *")  # yearly: only the slots we set
    slot = datetime(2025, 1, 1, tzinfo=timezone.utc)
    _set_next_run(service, schedule["id"], slot)
    first = Scheduler(service.settings, service.sessions, app.state.celery, name="A")
    second = Scheduler(service.settings, service.sessions, app.state.celery, name="B")
    # Late by far more than the grace: the latest slot (1 Jan 2026 or later) is run instead.
    report = first.run_once()
    assert len(report.fired) == 1 and report.fired[0].outcome == "created"
    fired_slot = report.fired[0].slot_at
    assert fired_slot > slot
    _set_next_run(service, schedule["id"], fired_slot)  # as if B read it before A committed
    report = second.run_once()
    assert report.fired == [] and report.lost == 1
    runs, jobs = _runs_and_jobs(service, schedule["id"])
    assert [(r.slot_at, r.scheduler) for r in runs] == [(fired_slot, "A")]
    assert [j.id for j in jobs] == [runs[0].job_id]


def test_missed_slots_become_one_job_for_the_latest(service: Service):
    app = service.client.app
    schedule = service.create(cron="0 * * * *")  # hourly
    now = utcnow()
    latest = now.replace(minute=0, second=0, microsecond=0)
    _set_next_run(service, schedule["id"], latest - timedelta(hours=5))  # down for 5 hours
    report = Scheduler(service.settings, service.sessions, app.state.celery, name="A").run_once()
    [fired] = report.fired
    assert fired.slot_at == latest and fired.outcome == "created"
    assert fired.message.startswith("5 missed slot(s) skipped")
    runs, jobs = _runs_and_jobs(service, schedule["id"])
    assert len(runs) == len(jobs) == 1
    with service.sessions() as session:
        assert session.get(Schedule, schedule["id"]).next_run_at == latest + timedelta(hours=1)


def _queued_job_ids(broker_url: str, queue: str) -> list[str]:
    """The job id of every task message waiting in the Redis queue."""
    db = int(broker_url.rsplit("/", 1)[1])
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=db)
    ids = []
    for key in client.scan_iter(match=f"{queue}*"):
        if client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            assert message["headers"]["task"] == "shortened.run_job"
            args, _kwargs, _ = json.loads(base64.b64decode(message["body"]))
            ids.append(args[0])
    return ids


def test_two_schedulers_create_exactly_one_job_per_slot(
    service: Service, postgres_url, tmp_path: Path
):
    client = service.client
    with redis_namespace() as (broker_url, queue):
        env = base_env(
            {
                "SHORTENED_DATABASE_URL": postgres_url,
                "SHORTENED_BROKER_URL": broker_url,
                "SHORTENED_QUEUE": queue,
                "SHORTENED_DATA_DIR": str(tmp_path / "var"),
                "SHORTENED_MAX_CONCURRENT_JOBS": "1000",
            }
        )
        schedulers = [
            start_process(
                [sys.executable, "-m", "service.scheduler", "--interval", "0.1", "--name", name],
                env,
                tmp_path / f"{name}.log",
            )
            for name in ("s1", "s2")
        ]
        try:
            for process in schedulers:
                wait_until(lambda p=process: "started" in p.log(), 60, "a scheduler", process)
            # Three schedules firing every second, raced for by both schedulers.
            schedules = [
                service.create(cron="* * * * * *", name=f"every-second-{i}") for i in range(3)
            ]
            time.sleep(8)
            for schedule in schedules:
                response = client.patch(
                    f"/schedules/{schedule['id']}",
                    json={"enabled": False},
                    headers=service.headers(),
                )
                assert response.status_code == 200
        finally:
            for process in schedulers:
                process.stop()
        logs = "\n".join(p.log() for p in schedulers)
        assert all(p.popen.returncode == 0 for p in schedulers), logs[-3000:]
        assert "Traceback" not in logs, logs[-3000:]
        messages = _queued_job_ids(broker_url, queue)

    by_scheduler: Counter[str] = Counter()
    all_jobs: list[str] = []
    for schedule in schedules:
        runs, jobs = _runs_and_jobs(service, schedule["id"])
        slots = [r.slot_at for r in runs]
        first = datetime.fromisoformat(schedule["next_run_at"])
        # Every second from the first slot on, each exactly once, each with its own job.
        assert len(slots) >= 5, slots
        assert slots == [first + i * SECOND for i in range(len(slots))], slots
        assert all(r.outcome == "created" and r.message is None for r in runs)
        assert sorted(r.job_id for r in runs) == sorted(j.id for j in jobs)
        assert len({j.idempotency_key for j in jobs}) == len(jobs)
        by_scheduler.update(r.scheduler for r in runs)
        all_jobs += [j.id for j in jobs]
    # Both schedulers won slots: they really competed, and neither ever doubled one.
    assert set(by_scheduler) == {"s1", "s2"} and min(by_scheduler.values()) >= 1, by_scheduler
    # Each job's task message was sent exactly once.
    assert sorted(messages) == sorted(all_jobs)
    print(
        f"\ntwo schedulers: {len(all_jobs)} slots of 3 schedules, {dict(by_scheduler)}, no duplicates"
    )


# ---------------------------------------------------------------------------- newest model


def _put_model(service: Service, key_prefix: str, extra: str | None = None) -> None:
    config = (REPO / "models" / "tiny-llama" / "config.json").read_bytes()
    service.s3.put_object(Bucket=service.bucket, Key=f"{key_prefix}config.json", Body=config)
    if extra:
        service.s3.put_object(Bucket=service.bucket, Key=f"{key_prefix}{extra}", Body=b"x")


def test_newest_model_under_an_s3_prefix_is_picked_at_fire_time(service: Service):
    client = service.client
    prefix = f"s3://{service.bucket}/nightly/"
    schedule = service.create(
        cron="0 2 * * *",
        # Nightly: prune the newest model at 20 % and evaluate it (a pipeline).
        template=template(
            model=None,
            num_blocks=None,
            target_ratio=0.2,
            eval={"perplexity": {"datasets": [DATA], "max_windows": 4}},
        ),
        model_selector={"prefix": prefix},
    )
    assert schedule["model_selector"] == {"prefix": prefix, "pick": "newest"}
    assert "model" not in schedule["template"]

    # Nothing under the prefix yet: a failed run (recorded), and the schedule goes on.
    response = client.post(f"/schedules/{schedule['id']}/trigger", headers=service.headers())
    assert response.status_code == 409 and response.json()["code"] == "template_failed"
    assert "no model directory" in response.json()["detail"]

    # Newest by modification time, not by name; a folder without config.json is no model.
    _put_model(service, "nightly/zz-older/", extra="model.safetensors")
    time.sleep(1.1)  # S3 LastModified has second resolution
    _put_model(service, "nightly/aa-newer/")
    time.sleep(1.1)
    service.s3.put_object(Bucket=service.bucket, Key="nightly/partial/model.safetensors", Body=b"x")
    response = client.post(f"/schedules/{schedule['id']}/trigger", headers=service.headers())
    assert response.status_code == 202, response.text
    run = response.json()
    assert run["model"] == f"{prefix}aa-newer/" and f"model {prefix}aa-newer/" in run["message"]
    job = client.get(f"/jobs/{run['job_id']}", headers=service.headers()).json()
    assert job["spec"]["model"] == f"{prefix}aa-newer/" and job["spec"]["target_ratio"] == 0.2
    assert job["spec"]["eval"]["perplexity"]["datasets"] == [DATA]

    # The scheduler resolves it the same way at a cron slot.
    _set_next_run(service, schedule["id"], utcnow() - SECOND)
    time.sleep(1.1)
    _put_model(service, "nightly/mm-newest/")
    report = Scheduler(
        service.settings, service.sessions, client.app.state.celery, name="A"
    ).run_once()
    [fired] = [f for f in report.fired if f.schedule_id == schedule["id"]]
    with service.sessions() as session:
        assert session.get(Job, fired.job_id).spec["model"] == f"{prefix}mm-newest/"
    runs = client.get(f"/schedules/{schedule['id']}", headers=service.headers()).json()["runs"]
    assert [r["outcome"] for r in runs] == ["created", "created", "failed"]


def test_newest_model_under_a_local_directory(service: Service):
    root = service.local_root
    for name, mtime in [("old", 1_700_000_000), ("new", 1_700_000_100)]:
        model = root / name
        model.mkdir()
        (model / "config.json").write_text("{}")
        os.utime(model / "config.json", (mtime, mtime))
    (root / "no-config").mkdir()
    (root / "no-config" / "weights.bin").write_text("x")
    schedule = service.create(
        template=template(model=None), model_selector={"prefix": f"file://{root}"}
    )
    response = service.client.post(
        f"/schedules/{schedule['id']}/trigger", headers=service.headers()
    )
    assert response.status_code == 202, response.text
    assert response.json()["model"] == str(root / "new")


# ---------------------------------------------------------------------------- end to end


def test_scheduled_prune_runs_on_a_real_worker_and_delete_stops_it(tmp_path: Path):
    """API (uvicorn, its scheduler thread) + Celery worker + Redis + PostgreSQL."""
    with redis_namespace() as (broker_url, queue), postgres_database() as database_url:
        upgrade_database(database_url)
        common = {
            "SHORTENED_DATABASE_URL": database_url,
            "SHORTENED_BROKER_URL": broker_url,
            "SHORTENED_QUEUE": queue,
            "SHORTENED_ARTIFACTS_URL": f"file://{tmp_path / 'artifacts'}",
        }
        worker = start_worker(
            base_env({**common, "SHORTENED_DATA_DIR": str(tmp_path / "worker")}),
            queue,
            tmp_path / "worker.log",
        )
        try:
            api_env = {
                **common,
                "SHORTENED_DATA_DIR": str(tmp_path / "api"),
                "SHORTENED_SCHEDULER_INTERVAL_S": "0.2",
                "SHORTENED_MIN_CRON_INTERVAL_S": "1",
            }
            api_process, url = start_api(base_env(api_env), free_port(), tmp_path / "api.log")
            try:
                with httpx.Client(base_url=url, timeout=30) as api:
                    response = api.post(
                        "/schedules", json={"cron": "*/3 * * * * *", "template": prune_spec()}
                    )
                    assert response.status_code == 201, response.text
                    schedule_id = response.json()["id"]

                    def first_run():
                        runs = api.get(f"/schedules/{schedule_id}").json()["runs"]
                        return runs[-1] if runs else None

                    run = wait_until(first_run, 30, "the first slot", api_process, interval=0.1)
                    assert run["outcome"] == "created" and run["scheduler"].count(":") == 2
                    assert api.delete(f"/schedules/{schedule_id}").status_code == 204
                    deleted_at = time.monotonic()
                    jobs_at_delete = {j["id"] for j in api.get("/jobs").json()["items"]}
                    assert run["job_id"] in jobs_at_delete and len(jobs_at_delete) <= 2

                    job = wait_for_job(api, run["job_id"], timeout=300, worker=worker)
                    assert job["status"] == "succeeded", job
                    assert len(job["result"]["removed_blocks"]) == 2
                    # Several slots have passed since the DELETE: no job was added.
                    time.sleep(max(0.0, 7 - (time.monotonic() - deleted_at)))
                    assert {j["id"] for j in api.get("/jobs").json()["items"]} == jobs_at_delete
                    assert api.get(f"/schedules/{schedule_id}").status_code == 404
            finally:
                api_process.stop()
        finally:
            worker.stop(timeout=60)
