"""Admission at the API: a job that cannot run is a 422 naming the field, at submission, for
single jobs, batches and schedule templates alike; nothing is queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import crud
from service.main import create_app
from shortened.config import Settings

SPEC = {
    "model": "models/tiny-llama",
    "num_blocks": 2,
    "calibration": {"source": "data/calibration.jsonl", "n_samples": 4},
}


def spec(**overrides) -> dict:
    return {**json.loads(json.dumps(SPEC)), **overrides}


@pytest.fixture
def client(database_url: str, tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    with TestClient(create_app(settings)) as client:
        yield client


def refusal(response) -> dict[tuple, str]:
    assert response.status_code == 422, response.text
    return {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}


def queued(client: TestClient) -> int:
    with client.app.state.sessionmaker() as session:
        return crud.count_active_jobs(session, "default")


def test_unusable_single_jobs_are_refused_with_the_field(client: TestClient) -> None:
    cases = [
        (spec(model="models/tiny-lama"), ("body", "model"), "does not exist"),
        (spec(num_blocks=20), ("body", "num_blocks"), "the model has 12 blocks"),
        (
            spec(calibration={"source": "data/calibraton.jsonl"}),
            ("body", "calibration", "source"),
            "does not exist",
        ),
        (
            spec(num_blocks=None, target_ratio=0.95),
            ("body", "target_ratio"),
            "at most 6 blocks",
        ),
        (
            spec(eval={"perplexity": {"datasets": ["data/missing.txt"]}}),
            ("body", "eval", "perplexity", "datasets", 0),
            "does not exist",
        ),
    ]
    for body, loc, words in cases:
        found = refusal(client.post("/jobs/prune", json=body))
        assert loc in found and words in found[loc], (loc, found)
    evaluation = {
        "model": "models/tiny-llama",
        "compare_with": "models/nope",
        "perplexity": {"datasets": ["data/stdlib_docs_heldout.txt"]},
    }
    assert ("body", "compare_with") in refusal(client.post("/jobs/eval", json=evaluation))
    assert queued(client) == 0
    assert client.post("/jobs/prune", json=spec()).status_code == 202


def test_job_sources_are_checked_against_the_job_store(client: TestClient) -> None:
    job = client.post("/jobs/prune", json=spec()).json()
    with client.app.state.sessionmaker() as session:
        crud.claim_job(session, job["id"], "test-worker")
        crud.finish_job(session, job["id"], "failed", message="boom", error_code="internal_error")
    found = refusal(
        client.post(
            "/jobs/eval",
            json={"model": f"job://{job['id']}", "perplexity": {"datasets": ["wikitext2"]}},
        )
    )
    assert "failed" in found[("body", "model")]


def test_a_batch_with_one_unusable_combination_creates_nothing(client: TestClient) -> None:
    body = {"base": spec(), "grid": {"num_blocks": [2, 4, 8]}}
    response = client.post("/jobs/batch", json=body)
    found = refusal(response)
    assert any("num_blocks=8" in msg and "at most 6 can go" in msg for msg in found.values())
    assert queued(client) == 0


def test_schedule_templates_are_admitted_too(client: TestClient) -> None:
    body = {
        "name": "nightly",
        "cron": "0 2 * * *",
        "kind": "prune",
        "template": spec(calibration={"source": "data/missing.jsonl"}),
    }
    found = refusal(client.post("/schedules", json=body))
    assert ("body", "template", "calibration", "source") in found
    # With a model selector the model is picked at each slot: only the rest is checked now.
    body = {
        "name": "nightly",
        "cron": "0 2 * * *",
        "kind": "prune",
        "template": {k: v for k, v in spec().items() if k != "model"},
        "model_selector": {"prefix": "models/", "pick": "newest"},
    }
    assert client.post("/schedules", json=body).status_code == 201
