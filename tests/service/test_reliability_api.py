"""Reliability at the API: authentication and tenancy, idempotent submission, hostile input,
per-tenant limits, verified artifact downloads, and a schemathesis fuzz of the OpenAPI schema.

Against a real SQLite and PostgreSQL job store, the real filesystem broker transport, a local
artifact store and (for the corruption test) a real S3-compatible server (moto).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.auth import create_api_key, hash_key, revoke_api_key
from service.db import upgrade_database
from service.main import create_app
from service.models import ApiKey
from service.stores.job_lifecycle import claim_job, finish_job, request_cancel
from shortened.config import Settings
from shortened.storage import open_store, publish_directory
from tests import reliability_figures as figures
from tests.helpers import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]
MODEL = str(REPO / "models" / "tiny-llama")
DATA = str(REPO / "data" / "calibration.jsonl")


def spec(**overrides) -> dict:
    body = {
        "model": MODEL,
        "criterion": "ppl",
        "num_blocks": 2,
        "calibration": {"source": DATA, "n_samples": 4},
    }
    body.update(overrides)
    return body


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_settings(tmp_path: Path, database_url: str | None = None, **overrides) -> Settings:
    values = dict(
        data_dir=tmp_path / "var",
        auth_required=True,
        allowed_local_roots=[REPO],
        allowed_buckets=["models-bucket"],
        reaper_interval_s=0,
    )
    if database_url:
        values["database_url"] = database_url
    values.update(overrides)
    return Settings(**values)


class Service:
    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.sessions = client.app.state.sessionmaker
        self.keys: dict[str, str] = {}
        for name, tenant, role in [
            ("acme", "acme", "member"),
            ("acme2", "acme", "member"),
            ("globex", "globex", "member"),
            ("admin", "ops", "admin"),
        ]:
            with self.sessions() as session:
                self.keys[name] = create_api_key(session, tenant, role)[1]

    def as_(self, who: str) -> dict[str, str]:
        return bearer(self.keys[who])

    def submit(self, who: str = "acme", **overrides) -> dict:
        response = self.client.post("/jobs/prune", json=spec(**overrides), headers=self.as_(who))
        assert response.status_code == 202, response.text
        return response.json()


@pytest.fixture
def service(tmp_path: Path, database_url: str):
    with TestClient(create_app(make_settings(tmp_path, database_url))) as client:
        yield Service(client)


def error_locs(response) -> list[tuple]:
    assert response.status_code == 422, response.text
    return [tuple(error["loc"]) for error in response.json()["detail"]]


# ---------------------------------------------------------------------------- authentication


def test_keys_cli_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path):
    env = {**os.environ, "SHORTENED_DATA_DIR": str(tmp_path / "var")}
    run = [sys.executable, "-m", "service.keys"]
    created = subprocess.run(
        [*run, "create", "--tenant", "acme", "--role", "member", "--name", "ci"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip()
    assert key.startswith("sk_") and len(key) >= 40 and "\n" not in key
    assert "not shown again" in created.stderr
    listed = subprocess.run(
        [*run, "list"], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "acme\tmember\tactive" in listed and key not in listed

    settings = Settings(data_dir=tmp_path / "var", auth_required=True)
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessionmaker() as session:
            [row] = session.scalars(select(ApiKey)).all()
        assert row.key_hash == hash_key(key) and key not in json.dumps(
            {c: str(getattr(row, c)) for c in ("id", "key_hash", "tenant", "role", "name")}
        )
        assert client.get("/jobs", headers=bearer(key)).status_code == 200
        subprocess.run([*run, "revoke", row.id], cwd=REPO, env=env, check=True, capture_output=True)
        response = client.get("/jobs", headers=bearer(key))
        assert response.status_code == 401 and response.json()["code"] == "unauthorized"

    bad_role = subprocess.run(
        [*run, "create", "--tenant", "x", "--role", "root"], cwd=REPO, env=env, capture_output=True
    )
    assert bad_role.returncode != 0


def test_requests_without_a_valid_key_are_401(service: Service):
    client = service.client
    cases = [
        ({}, "an API key is required"),
        (bearer("sk_not-a-real-key"), "invalid"),
        (bearer("x" * 5000), "invalid"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "an API key is required"),
    ]
    for headers, message in cases:
        for method, path in [("GET", "/jobs"), ("POST", "/jobs/prune"), ("GET", "/jobs/x/events")]:
            response = client.request(method, path, headers=headers, json=spec())
            assert response.status_code == 401, (headers, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert (
                response.json()["code"] == "unauthorized" and message in response.json()["detail"]
            )
    # Probes stay open for the orchestrator.
    assert client.get("/healthz").status_code == 200
    with service.sessions() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.tenant == "globex")).one()
        revoke_api_key(session, row.id)
    assert client.get("/jobs", headers=service.as_("globex")).status_code == 401


def test_every_job_event_and_artifact_is_scoped_to_its_tenant(service: Service, tmp_path: Path):
    client = service.client
    job = service.submit("acme")
    job_id = job["id"]
    assert job["tenant"] == "acme"
    settings = client.app.state.settings
    publish_fake_output(settings, service.sessions, job_id, tmp_path)

    # The same tenant's other key sees it; another tenant gets exactly the unknown-id answer.
    assert client.get(f"/jobs/{job_id}", headers=service.as_("acme2")).status_code == 200
    foreign = [
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/events"),
        ("GET", f"/jobs/{job_id}/artifacts"),
        ("GET", f"/jobs/{job_id}/artifacts/config.json"),
        ("POST", f"/jobs/{job_id}/cancel"),
    ]
    refused = 0
    for method, path in foreign:
        response = client.request(method, path, headers=service.as_("globex"))
        unknown = client.request(
            method, path.replace(job_id, "f" * 32), headers=service.as_("globex")
        )
        assert response.status_code == unknown.status_code == 404, (path, response.text)
        assert response.json()["detail"].replace(job_id, "ID") == unknown.json()["detail"].replace(
            "f" * 32, "ID"
        )
        refused += 1
    # Reading another tenant's output through a job:// source is refused the same way.
    for body in (
        spec(model=f"job://{job_id}"),
        spec(calibration={"source": f"job://{job_id}/report.json"}),
    ):
        response = client.post("/jobs/prune", json=body, headers=service.as_("globex"))
        assert response.status_code == 422 and f"no job '{job_id}'" in response.text
        refused += 1
    # Listing: members see their tenant only; an admin sees everything.
    other = service.submit("globex")["id"]
    assert [
        j["id"] for j in client.get("/jobs", headers=service.as_("globex")).json()["items"]
    ] == [other]
    assert [j["id"] for j in client.get("/jobs", headers=service.as_("acme")).json()["items"]] == [
        job_id
    ]
    everything = client.get("/jobs", headers=service.as_("admin")).json()["items"]
    assert {j["id"] for j in everything} == {job_id, other}
    assert client.get(f"/jobs/{other}/events", headers=service.as_("admin")).status_code == 200
    # The job is untouched by the refused cancel.
    assert (
        client.get(f"/jobs/{job_id}", headers=service.as_("acme")).json()["status"] == "succeeded"
    )
    # Its own tenant may use its output as a source.
    assert (
        client.post(
            "/jobs/prune", json=spec(model=f"job://{job_id}"), headers=service.as_("acme")
        ).status_code
        == 202
    )
    figures.count(cross_tenant_attempts=refused, cross_tenant_refused=refused)


def test_local_mode_without_keys_is_loopback_only(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "var", reaper_interval_s=0, allowed_local_roots=[REPO])
    assert settings.api_host == "127.0.0.1" and settings.resolved_auth_required is False
    app = create_app(settings)
    with TestClient(app, client=("127.0.0.1", 50000)) as local:
        job = local.post("/jobs/prune", json=spec())
        assert job.status_code == 202 and job.json()["tenant"] == "default"
    with TestClient(app, client=("10.1.2.3", 50000)) as remote:
        response = remote.get("/jobs")
        assert response.status_code == 401 and "non-local" in response.json()["detail"]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::"])
def test_non_loopback_bind_requires_keys(tmp_path: Path, host: str):
    assert Settings(api_host=host).resolved_auth_required is True
    with pytest.raises(RuntimeError, match="API keys are required"):
        create_app(Settings(data_dir=tmp_path, api_host=host, auth_required=False))
    from service.serve import serve

    with pytest.raises(RuntimeError, match="API keys are required"):
        serve(Settings(data_dir=tmp_path, api_host=host, auth_required=False))
    assert not (tmp_path / "shortened.db").exists()  # refused before touching anything


# ---------------------------------------------------------------------------- idempotency


def broker_messages(settings: Settings) -> int:
    return len(list((settings.data_dir / "broker" / "queue").glob("*.msg")))


def test_idempotency_key_returns_the_same_job(service: Service):
    client = service.client
    settings = client.app.state.settings
    headers = {**service.as_("acme"), "Idempotency-Key": "order-42"}
    first = client.post("/jobs/prune", json=spec(), headers=headers)
    assert first.status_code == 202
    # The same body, even with its keys in another order, is the same request.
    reordered = dict(reversed(list(spec().items())))
    for _ in range(3):
        again = client.post("/jobs/prune", json=reordered, headers=headers)
        assert again.status_code == 200, again.text
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["location"] == f"/jobs/{first.json()['id']}"
    assert broker_messages(settings) == 1  # one job, one message
    # A different body with the same key is refused, naming the header.
    response = client.post("/jobs/prune", json=spec(num_blocks=3), headers=headers)
    assert error_locs(response) == [("header", "Idempotency-Key")]
    assert first.json()["id"] in response.json()["detail"][0]["msg"]
    # Keys are per tenant: the same key elsewhere is a new job.
    other = client.post(
        "/jobs/prune", json=spec(), headers={**service.as_("globex"), "Idempotency-Key": "order-42"}
    )
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    # Malformed keys.
    for bad in ("", "has space", "x" * 256, "ünï".encode()):
        response = client.post(
            "/jobs/prune", json=spec(), headers={**service.as_("acme"), "Idempotency-Key": bad}
        )
        assert ("header", "Idempotency-Key") in error_locs(response), bad
    listed = client.get("/jobs", headers=service.as_("admin")).json()["items"]
    assert len(listed) == 2


def test_a_submission_while_the_broker_is_down_is_kept_and_sent_when_it_is_back(tmp_path: Path):
    from service.queue import make_celery
    from service.reaper import Reaper
    from tests.e2e_service import free_port

    settings = make_settings(tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    upgrade_database(settings)
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessionmaker() as session:
            key = create_api_key(session, "acme")[1]
        headers = {**bearer(key), "Idempotency-Key": "retry-me"}
        response = client.post("/jobs/prune", json=spec(), headers=headers)
        assert response.status_code == 202, response.text
        kept = response.json()
        assert kept["status"] == "queued"
        # A retry of the same request is the same job, not a second one.
        again = client.post("/jobs/prune", json=spec(), headers=headers)
        assert again.status_code == 200 and again.json()["id"] == kept["id"]
        assert [j["id"] for j in client.get("/jobs", headers=bearer(key)).json()["items"]] == [
            kept["id"]
        ]
        # The broker is back (here: the filesystem transport): the reaper's next round
        # sends the message, and the job is still queued, ready for a worker.
        working = settings.model_copy(update={"broker_url": None})
        report = Reaper(working, client.app.state.sessionmaker, make_celery(working)).run_once()
        assert report.redispatched == [kept["id"]] and report.send_errors == 0
        assert broker_messages(working) == 1
        assert client.get(f"/jobs/{kept['id']}", headers=bearer(key)).json()["status"] == "queued"
    figures.fault("broker_down_at_submission", 2)


# ---------------------------------------------------------------------------- hostile input

ESCAPES = [
    ("model", spec(model="/etc/passwd"), ("body", "model")),
    ("model", spec(model="file:///etc/passwd"), ("body", "model")),
    ("model", spec(model=f"{REPO}/models/../../etc"), ("body", "model")),
    ("model", spec(model="../../../../etc/shadow"), ("body", "model")),
    ("model", spec(model="/proc/self/environ"), ("body", "model")),
    ("model", spec(model="s3://other-bucket/model/"), ("body", "model")),
    ("model", spec(model="s3://models-bucket/../secrets/"), ("body", "model")),
    ("model", spec(model="hf://../../etc/passwd"), ("body", "model")),
    ("model", spec(model="hf://org/name@../../x"), ("body", "model")),
    ("model", spec(model="hf://org/name/../../etc/x.gguf"), ("body", "model")),
    ("model", spec(model="hf://org/name/sub/..%2F..%2Fx.gguf"), ("body", "model")),
    ("model", spec(model="/etc/x.gguf"), ("body", "model")),
    ("model", spec(model="job://not-a-job-id"), ("body", "model")),
    ("model", spec(model="job://" + "0" * 32), ("body", "model")),
    ("model", spec(model=MODEL + "\x00/x"), ("body", "model")),
    (
        "calibration.source",
        spec(calibration={"source": "/etc/passwd"}),
        ("body", "calibration", "source"),
    ),
    (
        "calibration.source",
        spec(calibration={"source": "data/../../../etc/passwd"}),
        ("body", "calibration", "source"),
    ),
    (
        "calibration.dataset",
        spec(calibration={"dataset": "../../etc"}),
        ("body", "calibration", "dataset"),
    ),
]


@pytest.mark.parametrize(
    ("field", "body", "loc"), ESCAPES, ids=[e[0] + str(i) for i, e in enumerate(ESCAPES)]
)
def test_sources_outside_the_allowed_roots_are_422_naming_the_field(
    service: Service, field: str, body: dict, loc: tuple
):
    response = service.client.post("/jobs/prune", json=body, headers=service.as_("acme"))
    assert loc in error_locs(response), response.text
    assert service.client.get("/jobs", headers=service.as_("acme")).json()["items"] == []
    figures.count(hostile_inputs=1, hostile_refused=1)


OTHER_KINDS = [
    (
        "/jobs/retrain",
        {"model": MODEL, "data": {"source": "/etc/passwd"}},
        ("body", "data", "source"),
    ),
    (
        "/jobs/retrain",
        {"model": MODEL, "data": {"source": DATA, "validation_source": "../x.jsonl"}},
        ("body", "data", "validation_source"),
    ),
    ("/jobs/retrain", {"model": "/root", "data": {"source": DATA}}, ("body", "model")),
    (
        "/jobs/retrain",
        {"model": MODEL, "data": {"source": DATA}, "cutoff_len": 100_000},
        ("body", "cutoff_len"),
    ),
    (
        "/jobs/eval",
        {"model": MODEL, "perplexity": {"datasets": ["wikitext2", "/etc/shadow"]}},
        ("body", "perplexity", "datasets", 1),
    ),
    (
        "/jobs/eval",
        {"model": MODEL, "compare_with": "s3://elsewhere/m/", "perplexity": {}},
        ("body", "compare_with"),
    ),
    (
        "/jobs/eval",
        {"model": MODEL, "zero_shot": {"task_include_path": "/etc"}},
        ("body", "zero_shot", "task_include_path"),
    ),
]


@pytest.mark.parametrize(("path", "body", "loc"), OTHER_KINDS)
def test_every_job_kind_is_checked(service: Service, path: str, body: dict, loc: tuple):
    response = service.client.post(path, json=body, headers=service.as_("acme"))
    assert loc in error_locs(response), response.text
    figures.count(hostile_inputs=1, hostile_refused=1)


def test_allowed_sources_are_accepted(service: Service):
    for body in (
        spec(model="s3://models-bucket/llama/"),
        spec(model="hf://meta-llama/Llama-2-7b-hf@main"),
        spec(model=f"file://{MODEL}"),
        spec(calibration={"dataset": "bookcorpus"}),
    ):
        response = service.client.post("/jobs/prune", json=body, headers=service.as_("acme"))
        assert response.status_code == 202, (body, response.text)


def test_symlinks_out_of_the_allowed_roots_and_disabled_hub_are_refused(tmp_path: Path):
    root = tmp_path / "models"
    root.mkdir()
    (root / "escape").symlink_to("/etc")
    (root / "m").mkdir()  # a checkpoint as far as admission can tell, and calibration text
    shutil.copy(TINY_MODEL / "config.json", root / "m" / "config.json")
    (root / "c.jsonl").write_text('{"text": "calibration text"}\n')
    settings = make_settings(tmp_path, allowed_local_roots=[root], hub_allowed=False)
    upgrade_database(settings)
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessionmaker() as session:
            headers = bearer(create_api_key(session, "acme")[1])
        for body, loc in [
            (spec(model=str(root / "escape" / "passwd")), ("body", "model")),
            (spec(model=MODEL), ("body", "model")),  # outside this server's roots
            (spec(model="hf://org/name"), ("body", "model")),
            (
                spec(model=str(root / "m"), calibration={"dataset": "bookcorpus"}),
                ("body", "calibration", "dataset"),
            ),
        ]:
            assert loc in error_locs(client.post("/jobs/prune", json=body, headers=headers))
            figures.count(hostile_inputs=1, hostile_refused=1)
        ok = client.post(
            "/jobs/prune",
            json=spec(model=str(root / "m"), calibration={"source": str(root / "c.jsonl")}),
            headers=headers,
        )
        assert ok.status_code == 202, ok.text


def test_request_body_size_limit_is_413(service: Service):
    client = service.client
    limit = client.app.state.settings.max_request_bytes
    huge = spec(model=MODEL + "/" + "a" * limit)
    response = client.post("/jobs/prune", json=huge, headers=service.as_("acme"))
    assert response.status_code == 413 and response.json()["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit still holds
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    response = client.post(
        "/jobs/prune",
        content=chunks(),
        headers={**service.as_("acme"), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert client.get("/jobs", headers=service.as_("acme")).json()["items"] == []
    figures.count(hostile_inputs=2, hostile_refused=2)


def test_per_tenant_limits(tmp_path: Path, database_url: str):
    settings = make_settings(
        tmp_path,
        database_url,
        max_concurrent_jobs=2,
        max_calibration_samples=64,
        max_seq_len=512,
        tenant_limits={"bigco": {"max_concurrent_jobs": 3, "max_calibration_samples": 1000}},
    )
    with TestClient(create_app(settings)) as client:
        service = Service(client)
        with service.sessions() as session:
            service.keys["bigco"] = create_api_key(session, "bigco")[1]
        over = spec(calibration={"source": DATA, "n_samples": 65, "seq_len": 513})
        response = client.post("/jobs/prune", json=over, headers=service.as_("acme"))
        assert set(error_locs(response)) == {
            ("body", "calibration", "n_samples"),
            ("body", "calibration", "seq_len"),
        }
        assert "at most 64" in response.text and "at most 512 tokens" in response.text
        # bigco's override allows more samples (but not a longer sequence).
        assert (
            client.post(
                "/jobs/prune",
                json=spec(calibration={"source": DATA, "n_samples": 1000}),
                headers=service.as_("bigco"),
            ).status_code
            == 202
        )

        ids = [service.submit("acme")["id"] for _ in range(2)]
        response = client.post("/jobs/prune", json=spec(), headers=service.as_("acme"))
        assert response.status_code == 429, response.text
        assert response.json()["code"] == "too_many_jobs" and "limit 2" in response.json()["detail"]
        assert response.headers["retry-after"]
        assert service.submit("globex")  # other tenants are not affected
        # A retried request is answered even at the limit; a finished job frees a slot.
        with service.sessions() as session:
            request_cancel(session, ids[0])
        assert service.submit("acme")
        assert (
            client.post("/jobs/prune", json=spec(), headers=service.as_("acme")).status_code == 429
        )
        for _ in range(2):
            service.submit("bigco")
        assert (
            client.post("/jobs/prune", json=spec(), headers=service.as_("bigco")).status_code == 429
        )
    figures.count(hostile_inputs=4, hostile_refused=4)


# ---------------------------------------------------------------------------- artifacts


def publish_fake_output(settings: Settings, sessions, job_id: str, tmp_path: Path) -> dict:
    out = tmp_path / f"out-{job_id}"
    (out / "sub").mkdir(parents=True)
    (out / "config.json").write_text('{"num_hidden_layers": 4}')
    (out / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (out / "sub" / "notes.txt").write_text("nested")
    store = open_store(settings.resolved_artifacts_url, s3_endpoint_url=settings.s3_endpoint_url)
    manifest = publish_directory(store, out, f"jobs/{job_id}")
    with sessions() as session:
        claim_job(session, job_id, "test-worker")
        finish_job(session, job_id, "succeeded", message="ok", artifacts=manifest["files"])
    return manifest


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_corrupted_artifact_is_reported_never_served(tmp_path: Path, backend: str, request):
    overrides: dict = {}
    if backend == "s3":
        import boto3

        endpoint = request.getfixturevalue("s3_server")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        bucket = f"corrupt-{os.getpid()}-{tmp_path.name[-6:]}".lower().replace("_", "-")
        s3.create_bucket(Bucket=bucket)
        overrides = {"artifacts_url": f"s3://{bucket}/a", "s3_endpoint_url": endpoint}
    settings = make_settings(tmp_path, **overrides)
    upgrade_database(settings)
    with TestClient(create_app(settings)) as client:
        service = Service(client)
        job_id = service.submit("acme")["id"]
        publish_fake_output(settings, service.sessions, job_id, tmp_path)
        headers = service.as_("acme")
        url = f"/jobs/{job_id}/artifacts/model.safetensors"
        good = client.get(url, headers=headers)
        assert good.status_code == 200 and good.content == bytes(range(256)) * 4096

        def put(name: str, data: bytes) -> None:
            if backend == "s3":
                s3.put_object(Bucket=bucket, Key=f"a/jobs/{job_id}/{name}", Body=data)
            else:
                (settings.data_dir / "artifacts" / "jobs" / job_id / name).write_bytes(data)

        # Same size, one byte flipped: only the sha256 tells.
        flipped = bytearray(good.content)
        flipped[1000] ^= 0xFF
        put("model.safetensors", bytes(flipped))
        response = client.get(url, headers=headers)
        assert response.status_code == 502, response.text
        assert response.json()["code"] == "artifact_corrupted"
        assert "model.safetensors" in response.json()["detail"]
        assert bytes(flipped) not in response.content
        # Truncated.
        put("model.safetensors", good.content[:100])
        assert client.get(url, headers=headers).json()["code"] == "artifact_corrupted"
        # Deleted from under the manifest.
        if backend == "s3":
            s3.delete_object(Bucket=bucket, Key=f"a/jobs/{job_id}/sub/notes.txt")
        else:
            (settings.data_dir / "artifacts" / "jobs" / job_id / "sub" / "notes.txt").unlink()
        response = client.get(f"/jobs/{job_id}/artifacts/sub/notes.txt", headers=headers)
        assert response.status_code == 502 and response.json()["code"] == "artifact_corrupted"
        # A manifest rewritten to match a substituted file does not match the job's record.
        manifest = json.loads(client.get(f"/jobs/{job_id}/artifacts", headers=headers).text)
        assert len(manifest) == 3
        forged = {
            "files": [
                dict(e, sha256="0" * 64) if e["name"] == "config.json" else e for e in manifest
            ]
        }
        put("manifest.json", json.dumps(forged).encode())
        for path in (f"/jobs/{job_id}/artifacts", f"/jobs/{job_id}/artifacts/config.json"):
            response = client.get(path, headers=headers)
            assert response.status_code == 502 and response.json()["code"] == "artifact_corrupted"
        # Nothing is left in the API's spool directory.
        assert list((settings.data_dir / "tmp" / "downloads").iterdir()) == []
    figures.fault("corrupted_artifact", 4)


# ---------------------------------------------------------------------------- fuzzing


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path):
    """Every operation of the OpenAPI schema, with generated valid and invalid input, as an
    authenticated member: no 5xx, every status code, header and body as documented."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hypothesis_settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    settings = make_settings(tmp_path, max_concurrent_jobs=100_000)
    upgrade_database(settings)
    app = create_app(settings)
    cases = 0
    failures: list[str] = []
    with TestClient(app) as client:
        with client.app.state.sessionmaker() as session:
            key = create_api_key(session, "fuzz")[1]
        job_id = client.post("/jobs/prune", json=spec(), headers=bearer(key)).json()["id"]
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)

        def fuzz(operation, mode) -> None:
            @hypothesis_settings(
                max_examples=60,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(mode))
            def run(case) -> None:
                nonlocal cases
                cases += 1
                path = case.path_parameters or {}
                if "job_id" in path and cases % 2 == 0:
                    path["job_id"] = job_id  # reach past the 404 too
                response = case.call(headers={"Authorization": f"Bearer {key}"})
                try:
                    case.validate_response(response, checks=checks)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # schemathesis' FailureGroup is an exception group
                    failures.append(f"{case.method} {case.formatted_path} ({mode.value}): {exc}")

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz)
                assert mode == schemathesis.GenerationMode.NEGATIVE

        for result in schema.get_all_operations():
            for mode in (
                schemathesis.GenerationMode.POSITIVE,
                schemathesis.GenerationMode.NEGATIVE,
            ):
                fuzz(result.ok(), mode)
    figures.count(fuzz_cases=cases)
    assert cases >= 200
    assert not failures, "\n\n".join(failures[:5])
