"""``POST /jobs/search`` admission and ``GET /jobs/{id}/ranking``: bad budgets are a 422
naming the field and queue nothing; the ranking is served only for a succeeded search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.stores.job_admission import count_active_jobs, create_job
from shortened.config import Settings

SPEC = {
    "model": "models/tiny-llama",
    "num_blocks": {"min": 1, "max": 2},
    "calibration": {"source": "data/calibration.jsonl", "n_samples": 4},
}


def spec(**overrides) -> dict:
    return {**json.loads(json.dumps(SPEC)), **overrides}


@pytest.fixture
def client(database_url: str, tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    with TestClient(create_app(settings)) as client:
        yield client


def test_bad_searches_are_refused_naming_the_field(client: TestClient) -> None:
    cases = [
        (spec(num_blocks={"min": 3, "max": 2}), ("body", "num_blocks"), "must not exceed"),
        (spec(num_blocks={"min": 7, "max": 9}), ("body", "num_blocks", "min"), "at most 6 can go"),
        (spec(num_blocks=None, min_speedup=2.5), ("body", "min_speedup"), "below 2.5"),
        (spec(num_blocks=None, min_speedup=1.0), ("body", "min_speedup"), "greater than 1"),
        (spec(min_speedup=1.5), ("body",), "exactly one of"),
        (spec(criteria=[]), ("body", "criteria"), "at least 1"),
        (spec(criteria=["ppl", "ppl"]), ("body", "criteria"), "at most once"),
        (spec(criteria=["oracle"]), ("body", "criteria", 0), "Input should be"),
        (spec(validation={"max_windows": 0}), ("body", "validation", "max_windows"), "greater"),
        (spec(calibration=None), ("body", "calibration"), ""),
        (
            spec(calibration={"source": "data/missing.jsonl"}),
            ("body", "calibration", "source"),
            "does not exist",
        ),
    ]
    for body, loc, words in cases:
        response = client.post("/jobs/search", json=body)
        assert response.status_code == 422, (body, response.text)
        found = {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}
        assert loc in found and words in found[loc], (loc, found)
    with client.app.state.sessionmaker() as session:
        assert count_active_jobs(session, "default") == 0


def test_a_good_search_is_queued_as_a_search_job(client: TestClient) -> None:
    response = client.post("/jobs/search", json=spec())
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "search"
    assert job["spec"]["criteria"] == ["ppl", "taylor", "magnitude", "block_influence", "angular"]
    assert client.get("/jobs", params={"kind": "search"}).json()["items"][0]["id"] == job["id"]
    # Not finished: no ranking yet.
    assert client.get(f"/jobs/{job['id']}/ranking").status_code == 409


def test_the_ranking_of_a_succeeded_search_as_json_and_markdown(client: TestClient) -> None:
    search = {
        "ranking": [
            {
                "rank": 1,
                "criteria": ["ppl", "taylor"],
                "num_blocks": 2,
                "removed_blocks": [5, 6],
                "params_after": 100,
                "params_removed_ratio": 0.2,
                "estimated_speedup": 1.2,
                "validation_ppl": 12.5,
            },
            {
                "rank": 2,
                "criteria": ["magnitude"],
                "num_blocks": 2,
                "removed_blocks": [4, 5],
                "params_after": 100,
                "params_removed_ratio": 0.2,
                "estimated_speedup": 1.2,
                "validation_ppl": 14.25,
            },
        ]
    }
    with client.app.state.sessionmaker() as session:
        job = create_job(session, "search", spec(), tenant="default")
        prune = create_job(session, "prune", {"model": "m"}, tenant="default")
        for row in (job, prune):
            row.status = "succeeded"
        job.result = {"search": search}
        prune.result = {"removed_blocks": [1]}
        session.commit()
        job_id, prune_id = job.id, prune.id
    assert client.get(f"/jobs/{job_id}/ranking").json() == search
    markdown = client.get(f"/jobs/{job_id}/ranking", params={"format": "markdown"})
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert markdown.text.splitlines()[2:] == [
        "| 1 | ppl,taylor | 2 | 5,6 | 100 | 0.2 | 1.2 | 12.5 |",
        "| 2 | magnitude | 2 | 4,5 | 100 | 0.2 | 1.2 | 14.25 |",
    ]
    assert client.get(f"/jobs/{prune_id}/ranking").status_code == 409
    assert client.get("/jobs/nope/ranking").status_code == 404
    assert client.get(f"/jobs/{job_id}/ranking", params={"format": "csv"}).status_code == 422
