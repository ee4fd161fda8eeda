"""The job API against a real SQLite job store and the real (filesystem) broker transport.

No worker runs here: worker-side transitions are made with the same store functions the
worker uses, so every route is exercised on every status.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.db import alembic_config, upgrade_database
from service.main import create_app
from service.stores.job_lifecycle import claim_job, finish_job, record_progress
from shortened.config import Settings
from shortened.storage import open_store, publish_directory

SPEC = {
    "model": "models/tiny-llama",
    "criterion": "ppl",
    "num_blocks": 2,
    "calibration": {"source": "data/calibration.jsonl", "n_samples": 4},
}


def spec(**overrides):
    return {**json.loads(json.dumps(SPEC)), **overrides}


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """The same tests on the embedded SQLite store and on PostgreSQL."""
    return Settings(data_dir=tmp_path / "var", database_url=database_url)


@pytest.fixture
def client(settings: Settings):
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def sessions(client: TestClient):
    return client.app.state.sessionmaker


def submit(client: TestClient, **overrides) -> dict:
    response = client.post("/jobs/prune", json=spec(**overrides))
    assert response.status_code == 202, response.text
    return response.json()


def error_locs(response) -> list[tuple]:
    assert response.status_code == 422, response.text
    return [tuple(error["loc"]) for error in response.json()["detail"]]


# ---------------------------------------------------------------------------- submit


def test_submit_returns_queued_job_and_sends_message(client: TestClient, settings: Settings):
    response = client.post("/jobs/prune", json=spec())
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["kind"] == "prune" and job["status"] == "queued"
    assert len(job["id"]) == 32 and int(job["id"], 16) >= 0
    assert job["created_at"] and job["started_at"] is None and job["finished_at"] is None
    assert job["error"] is None and job["result"] is None and job["attempts"] == 0
    # The stored spec is the validated one with every default filled in.
    assert job["spec"]["calibration"]["seq_len"] == 128 and job["spec"]["protect_first"] == 4
    # The task message went to the configured queue of the embedded broker.
    messages = list((settings.data_dir / "broker" / "queue").glob("*.msg"))
    assert len(messages) == 1
    message = json.loads(messages[0].read_text())
    assert message["headers"]["task"] == "shortened.run_job"
    assert message["properties"]["delivery_info"]["routing_key"] == settings.queue
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([job["id"]], {})  # the message carries the job id only
    assert client.get(f"/jobs/{job['id']}").json() == job


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (spec(unknown_field=1), ("body", "unknown_field")),
        (spec(num_blocks=0), ("body", "num_blocks")),
        (spec(criterion="random"), ("body", "criterion")),
        (spec(model="ftp://host/model"), ("body", "model")),
        (
            spec(calibration={"source": "data/c.jsonl", "n_samples": 0}),
            ("body", "calibration", "n_samples"),
        ),
        (spec(calibration={"source": "x", "extra": 1}), ("body", "calibration", "extra")),
        ({k: v for k, v in SPEC.items() if k != "model"}, ("body", "model")),
        (spec(device="tpu"), ("body", "device")),
    ],
)
def test_invalid_spec_is_422_naming_the_field(client: TestClient, body: dict, loc: tuple):
    assert loc in error_locs(client.post("/jobs/prune", json=body))


def test_both_or_neither_target_is_422(client: TestClient):
    for body in (spec(target_ratio=0.25), {k: v for k, v in SPEC.items() if k != "num_blocks"}):
        response = client.post("/jobs/prune", json=body)
        assert error_locs(response) == [("body",)]
        message = response.json()["detail"][0]["msg"]
        assert "num_blocks" in message and "target_ratio" in message


def test_invalid_submission_creates_no_job(client: TestClient):
    client.post("/jobs/prune", json=spec(num_blocks=0))
    assert client.get("/jobs").json()["items"] == []


def test_broker_down_keeps_the_job_queued_for_the_reaper(tmp_path: Path):
    settings = Settings(
        data_dir=tmp_path / "var",
        broker_url=f"redis://127.0.0.1:{closed_port()}/0",
        reaper_interval_s=0,
    )
    upgrade_database(settings)
    with TestClient(create_app(settings)) as client:
        response = client.post("/jobs/prune", json=spec())
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "queued" and response.headers["location"] == f"/jobs/{job['id']}"
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "queued"
        types = [(e["type"], e["data"]) for e in client.get(f"/jobs/{job['id']}/events").json()]
        assert types == [
            ("status", {"status": "queued"}),
            ("warning", {"reason": "broker_unavailable"}),
        ]


# ---------------------------------------------------------------------------- read


def test_unknown_job_is_404_everywhere(client: TestClient):
    for method, path in [
        ("GET", "/jobs/0123456789abcdef0123456789abcdef"),
        ("GET", "/jobs/nope/events"),
        ("POST", "/jobs/nope/cancel"),
        ("GET", "/jobs/nope/artifacts"),
        ("GET", "/jobs/nope/artifacts/config.json"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert "not found" in response.json()["detail"]


def test_list_pagination_and_filters(client: TestClient, sessions):
    ids = [submit(client)["id"] for _ in range(7)]
    newest_first = list(reversed(ids))

    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"after": cursor} if cursor else {})}
        page = client.get("/jobs", params=params).json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page["items"]) == 3
    assert seen == newest_first

    # Cancel two; filters by status and kind.
    client.post(f"/jobs/{ids[1]}/cancel")
    client.post(f"/jobs/{ids[4]}/cancel")
    cancelled = client.get("/jobs", params={"status": "cancelled"}).json()
    assert [job["id"] for job in cancelled["items"]] == [ids[4], ids[1]]
    queued = client.get("/jobs", params={"status": "queued", "kind": "prune", "limit": 200}).json()
    assert len(queued["items"]) == 5 and queued["next_cursor"] is None

    # A page boundary keeps working when jobs are added in between (cursor, not offset).
    first = client.get("/jobs", params={"limit": 2}).json()
    submit(client)
    second = client.get("/jobs", params={"limit": 2, "after": first["next_cursor"]}).json()
    assert [j["id"] for j in second["items"]] == newest_first[2:4]


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"limit": 0}, ("query", "limit")),
        ({"limit": 201}, ("query", "limit")),
        ({"status": "done"}, ("query", "status")),
        ({"kind": "train"}, ("query", "kind")),
        ({"after": "not-a-cursor"}, ("query", "after")),
    ],
)
def test_list_validation(client: TestClient, params: dict, loc: tuple):
    assert loc in error_locs(client.get("/jobs", params=params))


def test_same_timestamp_jobs_paginate_by_id(client: TestClient, sessions):
    """Ties on created_at are broken by id, so no job is skipped or repeated."""
    from service.models import Job

    ids = [submit(client)["id"] for _ in range(5)]
    with sessions() as session:
        stamp = session.get(Job, ids[0]).created_at
        for job_id in ids:
            session.get(Job, job_id).created_at = stamp
        session.commit()
    pages, cursor = [], None
    while True:
        page = client.get(
            "/jobs", params={"limit": 2, **({"after": cursor} if cursor else {})}
        ).json()
        pages += [j["id"] for j in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert pages == sorted(ids, reverse=True)


# ---------------------------------------------------------------------------- lifecycle, events, cancel


def run_worker_steps(sessions, job_id: str, *, finish: str | None = "succeeded", **fields):
    """What the worker does to the job store, through the same functions."""
    with sessions() as session:
        assert claim_job(session, job_id, "test-worker") is not None
        record_progress(
            session,
            job_id,
            stage="loading",
            done=0,
            total=0,
            unit="",
            events=[("stage", "loading", {"stage": "loading"})],
        )
        record_progress(
            session,
            job_id,
            stage="scoring",
            done=1,
            total=4,
            unit="blocks",
            events=[("stage", "scoring", {"stage": "scoring"}), ("metric", "ppl", {"ppl": 12.5})],
        )
        if finish:
            finish_job(session, job_id, finish, message=finish, **fields)


def test_job_progress_and_events_in_order(client: TestClient, sessions):
    job_id = submit(client)["id"]
    run_worker_steps(sessions, job_id, finish=None)

    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "running" and job["stage"] == "scoring" and job["attempts"] == 1
    assert job["progress"] == {"fraction": 0.25, "done": 1, "total": 4, "unit": "blocks"}
    assert job["started_at"] is not None

    events = client.get(f"/jobs/{job_id}/events").json()
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert [(e["type"], e["message"]) for e in events] == [
        ("status", "queued"),
        ("status", "running"),
        ("stage", "loading"),
        ("stage", "scoring"),
        ("metric", "ppl"),
    ]
    assert events[4]["data"] == {"ppl": 12.5}
    times = [e["time"] for e in events]
    assert times == sorted(times)

    # Incremental polling.
    assert [
        e["seq"] for e in client.get(f"/jobs/{job_id}/events", params={"after_seq": 3}).json()
    ] == [4, 5]
    assert client.get(f"/jobs/{job_id}/events", params={"after_seq": 5}).json() == []
    assert client.get(f"/jobs/{job_id}/events", params={"after_seq": -1}).status_code == 422

    with sessions() as session:
        finish_job(
            session,
            job_id,
            "failed",
            message="boom",
            error_code="model_not_found",
            error_message="no such model",
        )
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["finished_at"] is not None
    assert job["error"] == {"code": "model_not_found", "message": "no such model"}
    assert client.get(f"/jobs/{job_id}/events").json()[-1]["data"] == {
        "status": "failed",
        "code": "model_not_found",
    }


def test_cancel_queued_job_is_immediate_and_the_worker_skips_it(client: TestClient, sessions):
    job_id = submit(client)["id"]
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    # The task message arrives later: the job is no longer queued, so it is not run.
    with sessions() as session:
        assert claim_job(session, job_id, "late-worker") is None
    assert client.get(f"/jobs/{job_id}").json()["attempts"] == 0
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 409


def test_cancel_running_job_sets_the_flag(client: TestClient, sessions):
    from shortened.engine.errors import Cancelled
    from shortened.engine.progress import Progress
    from worker.reporter import JobReporter

    job_id = submit(client)["id"]
    run_worker_steps(sessions, job_id, finish=None)
    reporter = JobReporter(sessions, job_id)
    reporter(Progress("scoring", 2, 4, "blocks"))  # not cancelled: no exception

    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 202  # idempotent, one event
    assert [e["message"] for e in client.get(f"/jobs/{job_id}/events").json()].count(
        "cancel requested"
    ) == 1

    # Within the same second and block the flag is not read again (no DB round trip) ...
    reporter(Progress("scoring", 2, 4, "blocks"))
    # ... but at the next block it is, and the engine is stopped there.
    with pytest.raises(Cancelled):
        reporter(Progress("scoring", 3, 4, "blocks"))


def test_cancel_finished_job_is_409(client: TestClient, sessions):
    job_id = submit(client)["id"]
    run_worker_steps(
        sessions, job_id, finish="succeeded", result={"removed_blocks": [4, 5]}, artifacts=[]
    )
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert "succeeded" in response.json()["detail"]
    assert client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"


def test_worker_cannot_claim_a_job_twice(client: TestClient, sessions):
    job_id = submit(client)["id"]
    with sessions() as session:
        assert claim_job(session, job_id, "w1") is not None
        assert claim_job(session, job_id, "w2") is None  # redelivered message
        finish_job(session, job_id, "succeeded", message="ok")
        assert claim_job(session, job_id, "w3") is None
        assert not finish_job(session, job_id, "failed", message="late")  # no second ending
    job = client.get(f"/jobs/{job_id}").json()
    assert job["attempts"] == 1 and job["status"] == "succeeded"


def test_non_finite_numbers_are_stored_as_null(client: TestClient, sessions):
    job_id = submit(client)["id"]
    inf, nan = float("inf"), float("nan")
    with sessions() as session:
        claim_job(session, job_id, "w")
        record_progress(
            session,
            job_id,
            stage="scoring",
            done=1,
            total=2,
            unit="blocks",
            events=[("metric", "scoring", {"block": 4, "ppl": inf})],
        )
        finish_job(session, job_id, "succeeded", message="ok", result={"scores": [1.5, inf, nan]})
    assert client.get(f"/jobs/{job_id}").json()["result"] == {"scores": [1.5, None, None]}
    assert client.get(f"/jobs/{job_id}/events").json()[-2]["data"] == {"block": 4, "ppl": None}


# ---------------------------------------------------------------------------- artifacts


def publish_fake_output(settings: Settings, sessions, job_id: str, tmp_path: Path) -> dict:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "config.json").write_text('{"num_hidden_layers": 4}')
    (out / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (out / "sub" / "notes.txt").write_text("nested")
    store = open_store(settings.resolved_artifacts_url)
    manifest = publish_directory(store, out, f"jobs/{job_id}")
    run_worker_steps(
        sessions,
        job_id,
        finish="succeeded",
        result={"removed_blocks": [4, 5]},
        artifacts=manifest["files"],
    )
    return manifest


def test_artifacts_are_listed_and_streamed_with_checksums(
    client: TestClient, settings: Settings, sessions, tmp_path: Path
):
    job_id = submit(client)["id"]
    assert client.get(f"/jobs/{job_id}/artifacts").status_code == 409  # not finished yet
    manifest = publish_fake_output(settings, sessions, job_id, tmp_path)

    job = client.get(f"/jobs/{job_id}").json()
    assert job["result"] == {"removed_blocks": [4, 5]}
    assert {a["name"] for a in job["artifacts"]} == {
        "config.json",
        "model.safetensors",
        "sub/notes.txt",
    }

    links = client.get(f"/jobs/{job_id}/artifacts").json()
    assert [(a["name"], a["size"], a["sha256"]) for a in links] == [
        (f["name"], f["size"], f["sha256"]) for f in manifest["files"]
    ]
    for link in links:
        assert link["url"] == f"/jobs/{job_id}/artifacts/{link['name']}"
        response = client.get(link["url"])
        assert response.status_code == 200
        assert response.headers["content-length"] == str(link["size"])
        assert hashlib.sha256(response.content).hexdigest() == link["sha256"]


@pytest.mark.parametrize(
    "name",
    [
        "manifest.json",
        "missing.bin",
        "..%2F..%2Fshortened.db",
        "%2E%2E/%2E%2E/shortened.db",
        "sub/..%2Fconfig.json",
        "%2Fetc%2Fpasswd",
    ],
)
def test_artifact_names_are_sanitised(
    client: TestClient, settings: Settings, sessions, tmp_path: Path, name: str
):
    job_id = submit(client)["id"]
    publish_fake_output(settings, sessions, job_id, tmp_path)
    response = client.get(f"/jobs/{job_id}/artifacts/{name}")
    assert response.status_code == 404
    assert b"SQLite" not in response.content and b"root:" not in response.content


# ---------------------------------------------------------------------------- health


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthz_and_readyz(client: TestClient):
    assert client.get("/healthz").json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ready"
    assert set(response.json()["components"]) == {"database", "broker", "storage"}


def test_readyz_503_when_broker_is_down(tmp_path: Path):
    settings = Settings(
        data_dir=tmp_path / "var", broker_url=f"redis://127.0.0.1:{closed_port()}/0"
    )
    upgrade_database(settings)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200  # liveness has no dependencies
        response = client.get("/readyz")
        assert response.status_code == 503
        components = response.json()["components"]
        assert components["broker"]["ok"] is False and components["broker"]["error"]
        assert components["database"]["ok"] is True and components["storage"]["ok"] is True


def test_readyz_503_when_database_is_down(tmp_path: Path):
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/test",
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["components"]["database"]["ok"] is False
        assert response.json()["components"]["broker"]["ok"] is True


def test_openapi_documents_the_spec(client: TestClient):
    schema = client.get("/openapi.json").json()
    assert "/jobs/prune" in schema["paths"] and "/jobs/{job_id}/events" in schema["paths"]
    assert "PruneSpec" in schema["components"]["schemas"]


# ---------------------------------------------------------------------------- migrations


def test_migrations_match_the_models(settings: Settings):
    from alembic import command

    command.check(alembic_config(settings.resolved_database_url))  # raises on any drift
