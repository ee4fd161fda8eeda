"""Locations decoded once and checked after decoding, in every field that names one; what a
tenant reads carries nothing internal; schedule, webhook endpoint, cron interval and write
rate quotas. Real HTTP through TestClient on a real SQLite job store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.auth import create_api_key
from service.main import create_app
from service.stores.events import append_event
from service.stores.job_lifecycle import claim_job, finish_job
from shortened.config import Settings, TenantLimits
from shortened.redact import redact
from tests.service.test_hostile_input import EVAL, PRUNE, RETRAIN, put

REPO = Path(__file__).resolve().parents[2]


def make_client(tmp_path: Path, **values: Any) -> TestClient:
    values.setdefault("allowed_local_roots", [REPO])
    values.setdefault("allowed_buckets", ["allowed-bucket"])
    settings = Settings(
        data_dir=tmp_path / "var", scheduler_interval_s=0, reaper_interval_s=0, **values
    )
    return TestClient(create_app(settings))


@pytest.fixture
def client(tmp_path: Path):
    with make_client(tmp_path) as client:
        yield client


# ---------------------------------------------------------------------------- locations

# Every field that names a location, as (route, body, path to the field).
FIELDS = [
    ("/jobs/prune", PRUNE, ("model",)),
    ("/jobs/prune", PRUNE, ("calibration", "source")),
    ("/jobs/retrain", RETRAIN, ("model",)),
    ("/jobs/retrain", RETRAIN, ("data", "source")),
    ("/jobs/retrain", put(RETRAIN, ("data",), {**RETRAIN["data"]}), ("data", "validation_source")),
    ("/jobs/eval", EVAL, ("model",)),
    ("/jobs/eval", {**EVAL, "compare_with": "models/tiny-llama"}, ("compare_with",)),
    ("/jobs/eval", EVAL, ("perplexity", "datasets", 0)),
    (
        "/jobs/eval",
        {**EVAL, "zero_shot": {"task_include_path": "data", "tasks": ["x"]}},
        ("zero_shot", "task_include_path"),
    ),
]
HOSTILE_LOCATIONS = [
    f"file://{REPO}/%2e%2e/%2e%2e/etc/passwd",  # percent-encoded '..'
    f"file://{REPO}/%2E%2E%2fetc",
    f"file://{REPO}/%252e%252e/etc",  # encoded twice: a second decoding would reveal '..'
    f"file://{REPO}/data%00.txt",  # NUL after decoding
    f"file://{REPO}/data%0a.txt",  # newline after decoding
    "models/tiny\x00llama",  # raw NUL
    "models/tiny\x1bllama",  # raw control character
    "file://localhost/etc/passwd",  # read as /etc/passwd by the storage layer
    "file://evil.example/etc/passwd",
    "file://etc/passwd",  # relative for the engine, host 'etc' for the storage layer
    f"{REPO}/../../etc",
    "/etc/passwd",
    "s3://allowed-bucket/a/%2e%2e/b",
    "s3://allowed-bucket/a/..%2Fb",
    "s3://allowed-bucket/a?versionId=1",
    "job://" + "0" * 32 + "/%2e%2e/%2e%2e/x",
]


@pytest.mark.parametrize("location", HOSTILE_LOCATIONS)
@pytest.mark.parametrize(("route", "body", "path"), FIELDS)
def test_every_location_field_refuses_hostile_locations(
    client: TestClient, route: str, body: dict, path: tuple, location: str
):
    response = client.post(route, json=put(body, path, location))
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    (error,) = [e for e in errors if e["loc"] == ["body", *path]]
    # Nothing outside the allowed roots is named: not the resolved path, not the roots.
    assert "/etc" not in error["msg"] and str(REPO) not in error["msg"]


@pytest.mark.parametrize(
    "location",
    [
        "models/tiny-llama",
        f"{REPO}/models/tiny-llama",
        f"file://{REPO}/models/tiny-llama",
        f"file://{REPO}/models/tiny%2Dllama",  # decoded once: models/tiny-llama
        "s3://allowed-bucket/models/m/",
    ],
)
def test_allowed_locations_pass(client: TestClient, location: str):
    response = client.post("/jobs/prune", json={**PRUNE, "model": location})
    assert response.status_code == 202, response.text


def test_refusal_message_says_outside_the_allowed_roots(client: TestClient):
    response = client.post("/jobs/prune", json={**PRUNE, "model": "/etc"})
    (error,) = response.json()["detail"]
    assert error["msg"] == "local path outside the allowed roots"
    # A plain path is a file name: '%2e%2e' is literal, inside the roots, and simply absent.
    response = client.post("/jobs/prune", json={**PRUNE, "model": "models/%2e%2e/x"})
    (error,) = response.json()["detail"]
    assert error["msg"] == "model directory 'models/%2e%2e/x' does not exist"


@pytest.mark.parametrize(
    "prefix",
    [
        f"file://{REPO}/%2e%2e/",
        f"file://{REPO}/models/%252e%252e/",
        "s3://allowed-bucket/m/%2e%2e/",
        f"file://{REPO}/models%00/",
        "/etc/",
    ],
)
def test_schedule_model_selector_prefix_is_checked_after_decoding(client: TestClient, prefix):
    template = {k: v for k, v in PRUNE.items() if k != "model"}
    response = client.post(
        "/schedules",
        json={"cron": "0 3 * * *", "template": template, "model_selector": {"prefix": prefix}},
    )
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "model_selector", "prefix"]
    assert str(REPO) not in error["msg"] and "/etc" not in error["msg"]


# ---------------------------------------------------------------------------- nothing internal

INTERNAL = [
    "Traceback (most recent call last)",
    "/work/",
    "/tmp/",
    "site-packages",
    "torch 2.",
    "errors.pydantic.dev",
    str(REPO),
]


def assert_nothing_internal(text: str) -> None:
    for marker in INTERNAL:
        assert marker not in text, (marker, text)


def test_redact_removes_tracebacks_paths_and_versions():
    message = (
        "OSError: cannot open /work/main/var/cache/model.bin (torch 2.3.1, transformers==4.44.0,"
        " Python 3.11.7) in /usr/lib/python3.11/site-packages/torch/serialization.py\n"
        "Traceback (most recent call last):\n"
        '  File "/work/main/worker/tasks.py", line 10, in run\n'
    )
    out = redact(message)
    assert_nothing_internal(out)
    assert out.startswith("OSError: cannot open <path>") and "torch" in out
    # The tenant's own names stay: URIs and relative paths.
    kept = "no model under s3://bucket/models/ or job://abc/model nor models/tiny-llama"
    assert redact(kept) == kept


def test_job_errors_and_events_read_through_the_api_carry_nothing_internal(client: TestClient):
    job = client.post("/jobs/prune", json=PRUNE).json()
    leaky = (
        f"RuntimeError: failed in {REPO}/shortened/engine/prune.py with torch 2.3.1\n"
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1, in f\n'
    )
    sessions = client.app.state.sessionmaker
    with sessions() as session:  # as the worker writes them
        assert claim_job(session, job["id"], worker="w") is not None
        append_event(
            session,
            job["id"],
            "warning",
            "UserWarning: deprecated",
            {"source": "/usr/lib/python3.11/site-packages/x.py:3", "traceback": leaky},
        )
        session.commit()
        finish_job(
            session,
            job["id"],
            "failed",
            message=leaky,
            error_code="internal_error",
            error_message=leaky,
        )
    body = client.get(f"/jobs/{job['id']}").text
    assert_nothing_internal(body)
    assert (
        "RuntimeError: failed in <path>"
        in client.get(f"/jobs/{job['id']}").json()["error"]["message"]
    )
    assert_nothing_internal(client.get(f"/jobs/{job['id']}/events").text)


def test_failed_schedule_run_message_carries_no_server_path(client: TestClient):
    empty = REPO / "var-test-empty-prefix"
    empty.mkdir(exist_ok=True)
    try:
        template = {k: v for k, v in PRUNE.items() if k != "model"}
        created = client.post(
            "/schedules",
            json={
                "cron": "0 3 * * *",
                "template": template,
                "model_selector": {"prefix": f"{empty}/"},
            },
        )
        assert created.status_code == 201, created.text
        response = client.post(f"/schedules/{created.json()['id']}/trigger")
        assert response.status_code == 409, response.text
        assert_nothing_internal(response.text)
        (run,) = client.get(f"/schedules/{created.json()['id']}").json()["runs"]
        assert run["outcome"] == "failed" and "no model directory" in run["message"]
        assert_nothing_internal(run["message"])
    finally:
        empty.rmdir()


# ---------------------------------------------------------------------------- quotas


@pytest.fixture
def keyed(tmp_path: Path):
    """Auth required; tenant 'small' has low limits, 'other' the defaults."""
    limits = {
        "small": TenantLimits(
            max_schedules=2, max_webhook_endpoints=1, write_rate_per_s=0.01, write_burst=6
        )
    }
    with make_client(
        tmp_path, auth_required=True, tenant_limits=limits, webhook_allow_private_targets=True
    ) as client:
        with client.app.state.sessionmaker() as session:
            keys = {tenant: create_api_key(session, tenant)[1] for tenant in ("small", "other")}
        yield client, {t: {"Authorization": f"Bearer {k}"} for t, k in keys.items()}


def test_schedule_and_webhook_endpoint_counts_are_capped_per_tenant(keyed):
    client, headers = keyed
    schedule = {"cron": "0 3 * * *", "template": PRUNE}
    for _ in range(2):
        assert client.post("/schedules", json=schedule, headers=headers["small"]).status_code == 201
    response = client.post("/schedules", json=schedule, headers=headers["small"])
    assert response.status_code == 429
    assert response.json()["code"] == "too_many_schedules"
    assert "max_schedules=2" in response.json()["detail"]
    hook = {"url": "http://127.0.0.1:9/hook"}
    assert client.post("/webhooks", json=hook, headers=headers["small"]).status_code == 201
    response = client.post("/webhooks", json=hook, headers=headers["small"])
    assert response.status_code == 429
    assert response.json()["code"] == "too_many_webhook_endpoints"
    assert "max_webhook_endpoints=1" in response.json()["detail"]
    # Another tenant has its own count (the default limits).
    assert client.post("/schedules", json=schedule, headers=headers["other"]).status_code == 201


@pytest.mark.parametrize(
    ("cron", "ok"),
    [
        ("* * * * * *", False),
        ("*/30 * * * * *", False),
        ("0,1 5 3 * * *", False),  # twice a day, one second apart
        ("0 * * * * *", True),  # a seconds field, once a minute
        ("* * * * *", True),
        ("@hourly", True),
    ],
)
def test_cron_interval_has_a_default_minimum_of_60_s(client: TestClient, cron: str, ok: bool):
    response = client.post("/schedules", json={"cron": cron, "template": PRUNE})
    if ok:
        assert response.status_code == 201, response.text
        # PATCH is checked the same way.
        patched = client.patch(
            f"/schedules/{response.json()['id']}", json={"cron": "*/10 * * * * *"}
        )
        assert patched.status_code == 422
        assert patched.json()["detail"][0]["loc"] == ["body", "cron"]
    else:
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "cron"] and "min_cron_interval_s" in error["msg"]


def test_cron_minimum_is_configurable_per_tenant(tmp_path: Path):
    limits = {
        "fast": TenantLimits(min_cron_interval_s=1),
        "slow": TenantLimits(min_cron_interval_s=600),
    }
    with make_client(tmp_path, auth_required=True, tenant_limits=limits) as client:
        with client.app.state.sessionmaker() as session:
            fast = create_api_key(session, "fast")[1]
            slow = create_api_key(session, "slow")[1]
        every_second = {"cron": "* * * * * *", "template": PRUNE}
        response = client.post(
            "/schedules", json=every_second, headers={"Authorization": f"Bearer {fast}"}
        )
        assert response.status_code == 201, response.text
        five_minutes = {"cron": "*/5 * * * *", "template": PRUNE}
        response = client.post(
            "/schedules", json=five_minutes, headers={"Authorization": f"Bearer {slow}"}
        )
        assert response.status_code == 422 and "600" in response.json()["detail"][0]["msg"]


def test_writes_are_rate_limited_per_tenant_with_retry_after(keyed):
    client, headers = keyed
    small = headers["small"]
    codes = []
    for _ in range(6):  # the burst: submissions and cancels alike
        job = client.post("/jobs/prune", json=PRUNE, headers=small)
        codes.append(job.status_code)
        if job.status_code != 202:
            break
        codes.append(client.post(f"/jobs/{job.json()['id']}/cancel", headers=small).status_code)
    assert 429 in codes
    response = client.post("/jobs/prune", json=PRUNE, headers=small)
    assert response.status_code == 429 and response.json()["code"] == "rate_limited"
    assert int(response.headers["Retry-After"]) >= 1
    assert "write_rate_per_s" in response.json()["detail"]
    # Reads are not charged, and another tenant has its own bucket.
    assert client.get("/jobs", headers=small).status_code == 200
    assert client.post("/jobs/prune", json=PRUNE, headers=headers["other"]).status_code == 202
