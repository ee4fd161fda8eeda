"""Batch grids end to end: POST /jobs/batch expands a grid into prune pipelines under one
batch id, a real Celery worker runs them (Redis, PostgreSQL), the score cache makes a grid
over block counts score once, and GET /batches/{id} compares the results."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e_service import (
    CALIBRATION,
    FINISHED,
    REPO,
    TINY_MODEL,
    postgres_database,
    redis_namespace,
    wait_until,
    worker_and_api,
)

HELDOUT = REPO / "data" / "stdlib_docs_heldout.txt"

pytestmark = pytest.mark.e2e


def base_spec(**overrides) -> dict:
    spec = {
        "model": str(TINY_MODEL),
        "criterion": "ppl",
        "num_blocks": 2,
        "protect_first": 1,
        "protect_last": 1,
        "calibration": {"source": str(CALIBRATION), "n_samples": 4, "seq_len": 64},
        "device": "cpu",
        "dtype": "float32",
        "eval": {
            "perplexity": {"datasets": [str(HELDOUT)], "seq_len": 64, "max_windows": 4},
            "device": "cpu",
            "dtype": "float32",
        },
    }
    spec.update(overrides)
    return spec


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from service.db import upgrade_database

    root = tmp_path_factory.mktemp("batches")
    with redis_namespace() as (broker_url, queue), postgres_database() as database_url:
        common = {
            "SHORTENED_DATABASE_URL": database_url,
            "SHORTENED_BROKER_URL": broker_url,
            "SHORTENED_QUEUE": queue,
            "SHORTENED_ARTIFACTS_URL": f"file://{root / 'artifacts'}",
            "SHORTENED_ALLOWED_LOCAL_ROOTS": json.dumps([str(REPO)]),
            "SHORTENED_MAX_CONCURRENT_JOBS": "6",
            "SHORTENED_MAX_BATCH_JOBS": "8",
        }
        upgrade_database(database_url)
        with worker_and_api(common, queue, root) as (worker, url):
            with httpx.Client(base_url=url, timeout=30) as api:
                yield {"api": api, "worker": worker}


def wait_for_batch(stack, batch_id: str, timeout: float = 400) -> dict:
    def check():
        summary = stack["api"].get(f"/batches/{batch_id}").json()
        done = all(row["status"] in FINISHED for row in summary["rows"])
        return summary if done else None

    return wait_until(check, timeout, f"batch {batch_id} to finish", stack["worker"], interval=0.5)


def test_grid_over_block_counts_scores_once_and_compares(stack):
    api = stack["api"]
    response = api.post(
        "/jobs/batch",
        json={"name": "tiny sweep", "base": base_spec(), "grid": {"num_blocks": [1, 2, 4]}},
    )
    assert response.status_code == 202, response.text
    batch = response.json()
    assert batch["job_count"] == 3 and len(batch["job_ids"]) == 3
    assert [p["values"] for p in batch["points"]] == [{"num_blocks": n} for n in (1, 2, 4)]
    assert response.headers["Location"] == f"/batches/{batch['id']}"
    for job_id, blocks in zip(batch["job_ids"], (1, 2, 4), strict=True):
        job = api.get(f"/jobs/{job_id}").json()
        assert job["spec"]["num_blocks"] == blocks

    summary = wait_for_batch(stack, batch["id"])
    assert summary["status"] == "succeeded", json.dumps(summary, indent=1)
    assert summary["counts"] == {"succeeded": 3}
    rows = {row["num_blocks"]: row for row in summary["rows"]}
    # One worker runs them in turn: the first scores the 10 removable blocks, the others
    # reuse all 10 (the grid scores once).
    reused = sorted(row["scores_reused"] for row in rows.values())
    assert reused == [0, 10, 10], reused
    # Likewise the eval steps: the first measures the unpruned parent, the others reuse it.
    baseline_reused = sorted(row["baseline_reused"] for row in rows.values())
    assert baseline_reused == [False, True, True], baseline_reused
    # Every row of the comparison table has the pruned size and the eval's perplexity.
    assert [len(rows[n]["removed_blocks"]) for n in (1, 2, 4)] == [1, 2, 4]
    assert rows[1]["params"] > rows[2]["params"] > rows[4]["params"]
    assert all(isinstance(row["ppl"], float) and row["ppl"] > 1 for row in rows.values())
    assert rows[4]["ppl"] > rows[1]["ppl"]  # removing more blocks costs perplexity
    assert {"job_id", "status", "num_blocks", "params", "ppl", "scores_reused"} <= set(
        summary["columns"]
    )
    assert summary["best_by_ppl"] == rows[1]["job_id"]
    # Each row's pipeline: the prune job and its eval follow-up.
    assert all([j["kind"] for j in row["jobs"]] == ["prune", "eval"] for row in rows.values())
    # The removal order is shared: fewer blocks removed are a subset of more.
    assert (
        set(rows[1]["removed_blocks"])
        <= set(rows[2]["removed_blocks"])
        <= set(rows[4]["removed_blocks"])
    )

    table = api.get(f"/batches/{batch['id']}", params={"format": "markdown"})
    assert table.status_code == 200 and table.headers["content-type"].startswith("text/markdown")
    lines = table.text.strip().splitlines()
    assert lines[0].startswith("| job_id | status | num_blocks |")
    assert len(lines) == 2 + 3 + 1  # header, rule, 3 jobs, the unpruned baseline
    assert lines[-1].startswith("| baseline |")
    # The eval compares against the unpruned model: its row is the reference.
    assert summary["baseline"]["params"] > rows[1]["params"]
    assert summary["baseline"]["ppl"] < rows[1]["ppl"]
    assert any(rows[4]["job_id"] in line for line in lines)

    listed = api.get("/batches").json()
    assert listed[0]["id"] == batch["id"]


def test_two_axis_grid_expands_in_order_and_validates_as_a_whole(stack):
    api = stack["api"]
    # One combination is invalid (taylor is fine, num_blocks 11 > 10 removable is not
    # checked until the model is loaded, but 0 is refused by the spec): nothing is created.
    before = api.get("/jobs", params={"limit": 200}).json()["items"]
    response = api.post(
        "/jobs/batch",
        json={"base": base_spec(), "grid": {"criterion": ["ppl", "taylor"], "num_blocks": [2, 0]}},
    )
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["body", "grid", "num_blocks"]
    assert "criterion='ppl', num_blocks=0" in detail[0]["msg"]
    assert api.get("/jobs", params={"limit": 200}).json()["items"] == before


@pytest.mark.parametrize(
    ("body", "loc", "needle"),
    [
        ({"base": base_spec(), "grid": {}}, ["body", "grid"], "at least 1"),
        ({"base": base_spec(), "grid": {"num_blocks": []}}, ["body", "grid"], "1 to 64 values"),
        ({"base": base_spec(), "grid": {"num blocks": [1]}}, ["body", "grid"], "dotted field path"),
        ({"base": base_spec(), "grid": {"num_blocks": [1, 1]}}, ["body", "grid"], "repeats"),
        (
            {"base": base_spec(), "grid": {"no_such_field": [1]}},
            ["body", "grid", "no_such_field"],
            "Extra inputs",
        ),
        (
            {"base": base_spec(criterion="nope"), "grid": {"num_blocks": [1]}},
            ["body", "base", "criterion"],
            "criterion",
        ),
        (
            {
                "base": base_spec(),
                "grid": {"num_blocks": [1, 2, 3], "criterion": ["ppl", "taylor", "magnitude"]},
            },
            ["body", "grid"],
            "9 combinations; at most 8",
        ),
        (
            {"base": base_spec(), "grid": {"num_blocks": [1]}, "extra": 1},
            ["body", "extra"],
            "Extra inputs",
        ),
        (
            {"base": base_spec(), "grid": {"eval.perplexity.seq_len": [1]}},
            ["body", "grid", "eval.perplexity.seq_len"],
            "",
        ),
    ],
)
def test_bad_grids_are_422_naming_the_field(stack, body, loc, needle):
    response = stack["api"].post("/jobs/batch", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(e["loc"][: len(loc)] == loc and needle in e["msg"] for e in detail), detail


def test_batch_over_the_concurrency_limit_is_429_and_creates_nothing(stack):
    api = stack["api"]
    before = len(api.get("/jobs", params={"limit": 200}).json()["items"])
    response = api.post(
        "/jobs/batch",
        json={"base": base_spec(), "grid": {"num_blocks": [1, 2, 3, 4, 5, 6, 7]}},  # limit 6
    )
    assert response.status_code == 429, response.text
    assert response.json()["code"] == "too_many_jobs"
    assert "this batch adds 7" in response.json()["detail"]
    assert len(api.get("/jobs", params={"limit": 200}).json()["items"]) == before


def test_idempotent_batch_replay(stack):
    api = stack["api"]
    body = {"base": base_spec(eval=None), "grid": {"num_blocks": [1]}}
    first = api.post("/jobs/batch", json=body, headers={"Idempotency-Key": "grid-1"})
    assert first.status_code == 202, first.text
    again = api.post("/jobs/batch", json=body, headers={"Idempotency-Key": "grid-1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = api.post(
        "/jobs/batch",
        json={**body, "grid": {"num_blocks": [2]}},
        headers={"Idempotency-Key": "grid-1"},
    )
    assert other.status_code == 422
    wait_for_batch(stack, first.json()["id"])
    assert api.get("/batches/nope").status_code == 404


def test_python_client_submits_and_reads_a_batch(stack):
    from shortened.client import ShortenedClient

    with ShortenedClient(str(stack["api"].base_url)) as client:
        batch = client.submit_batch(
            base_spec(eval=None), {"criterion": ["block_influence", "magnitude"]}, name="criteria"
        )
        assert batch.job_count == 2 and batch.name == "criteria"
        job = client.get(batch.job_ids[0])
        assert job.batch_id == batch.id and job.spec["criterion"] == "block_influence"
        summary = wait_until(
            lambda: (s := client.batch(batch.id)).finished and s, 300, "batch", stack["worker"]
        )
    assert summary.status == "succeeded"
    assert [row["criterion"] for row in summary.rows] == ["block_influence", "magnitude"]
    assert all(len(row["removed_blocks"]) == 2 for row in summary.rows)
    assert "ppl" not in summary.columns  # no eval step in these pipelines


def test_cli_submits_a_batch_waits_and_prints_the_table(stack, tmp_path):
    import subprocess
    import sys

    request = tmp_path / "grid.json"
    request.write_text(
        json.dumps(
            {"name": "cli grid", "base": base_spec(eval=None), "grid": {"num_blocks": [1, 3]}}
        )
    )
    url = str(stack["api"].base_url)
    command = [sys.executable, "-m", "shortened.cli", "jobs", "--url", url]
    done = subprocess.run(
        [*command, "batch", str(request), "--wait", "--poll-interval", "0.5", "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    batch_id = lines[0].strip()
    assert "batch " + batch_id in done.stdout and "(cli grid)" in done.stdout
    header = next(line for line in lines if "job_id" in line)
    assert "num_blocks" in header and "removed_blocks" in header and "scores_reused" in header
    rows = [
        line
        for line in lines
        if line.strip().startswith(tuple("0123456789abcdef")) and "succeeded" in line
    ]
    assert len(rows) == 2, done.stdout
    assert "succeeded: 2 succeeded" in done.stdout
    assert "[batch" in done.stderr  # progress lines go to stderr

    again = subprocess.run(
        [*command, "batch-get", batch_id, "--json"], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and json.loads(again.stdout)["counts"] == {"succeeded": 2}

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base": base_spec(), "grid": {"num_blocks": [0]}}))
    refused = subprocess.run(
        [*command, "batch", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "grid.num_blocks" in refused.stderr or "num_blocks" in refused.stderr, refused.stderr
