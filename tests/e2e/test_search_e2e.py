"""A search job end to end: HTTP API (uvicorn subprocess) -> PostgreSQL -> Redis -> real
Celery worker -> engine on models/tiny-llama -> S3 (moto) artifacts, continued by an eval
of the winner through the pipeline mechanism."""

from __future__ import annotations

import json

import pytest

from tests.e2e_service import (
    CALIBRATION,
    REPO,
    TINY_MODEL,
    download_artifacts,
    s3_stack,
    wait_for_job,
    wait_until,
)

HELDOUT = REPO / "data" / "stdlib_docs_heldout.txt"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    with s3_stack(s3_server, tmp_path_factory.mktemp("search"), [REPO]) as stack:
        yield stack


def search_spec(**overrides) -> dict:
    spec = {
        "model": str(TINY_MODEL),
        "criteria": ["ppl", "magnitude", "block_influence"],
        "num_blocks": {"min": 1, "max": 2},
        "calibration": {"source": str(CALIBRATION), "n_samples": 4, "seq_len": 64},
        "validation": {"max_windows": 4},
        "device": "cpu",
        "dtype": "float32",
    }
    spec.update(overrides)
    return spec


def test_search_publishes_the_best_model_and_its_ranking(stack):
    api = stack["api"]
    evaluation = {
        "perplexity": {"datasets": [str(HELDOUT)], "seq_len": 64, "max_windows": 2},
        "device": "cpu",
        "dtype": "float32",
    }
    response = api.post("/jobs/search", json=search_spec(eval=evaluation))
    assert response.status_code == 202, response.text
    assert response.json()["kind"] == "search"
    job_id = response.json()["id"]
    job = wait_for_job(api, job_id, worker=stack["worker"], timeout=300)
    assert job["status"] == "succeeded", job

    search = job["result"]["search"]
    ranking = search["ranking"]
    assert {c for row in ranking for c in row["criteria"]} == {
        "ppl",
        "magnitude",
        "block_influence",
    }
    assert all(1 <= row["num_blocks"] <= 2 for row in ranking)
    ppls = [row["validation_ppl"] for row in ranking]
    assert ppls == sorted(ppls) and search["best"] == ranking[0]
    assert job["result"]["removed_blocks"] == search["best"]["removed_blocks"]

    # The published model is the winner: downloaded, verified, loadable, with its blocks gone.
    model_dir = stack["root"] / "best"
    download_artifacts(api, job_id, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 12 - search["best"]["num_blocks"]
    report = json.loads((model_dir / "report.json").read_text())
    assert report["search"]["ranking"] == ranking
    from transformers import AutoModelForCausalLM

    assert (
        len(AutoModelForCausalLM.from_pretrained(model_dir).model.layers)
        == config["num_hidden_layers"]
    )

    markdown = api.get(f"/jobs/{job_id}/ranking", params={"format": "markdown"})
    assert markdown.status_code == 200 and markdown.headers["content-type"].startswith(
        "text/markdown"
    )
    lines = markdown.text.splitlines()
    assert lines[0].startswith("| rank | criteria | num_blocks | removed_blocks")
    assert len(lines) == 2 + len(ranking)
    best_cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert best_cells[0] == "1"
    assert best_cells[3] == ",".join(map(str, search["best"]["removed_blocks"]))
    assert api.get(f"/jobs/{job_id}/ranking").json() == search

    page = api.get(f"/jobs/{job_id}/report")
    assert page.status_code == 200
    assert 'id="ranking"' in page.text and page.text.count("data-rank=") == len(ranking)

    # The pipeline continues with the winner: job://<search id> evaluated against the parent.
    def eval_step():
        steps = api.get(f"/jobs/{job_id}").json()["pipeline"]["jobs"]
        return next((s["id"] for s in steps if s["kind"] == "eval"), None)

    eval_id = wait_until(eval_step, 60, "the eval step of the search's pipeline", stack["worker"])
    evaluated = wait_for_job(api, eval_id, worker=stack["worker"], timeout=300)
    assert evaluated["status"] == "succeeded", evaluated
    assert evaluated["spec"]["model"] == f"job://{job_id}"
    assert evaluated["spec"]["compare_with"] == str(TINY_MODEL)
    assert evaluated["parent_id"] == job_id


def test_client_and_jobs_cli_submit_a_search(stack, tmp_path, capsys):
    from shortened.cli import main
    from shortened.client import ShortenedClient

    url = str(stack["api"].base_url)
    spec = search_spec(criteria=["magnitude", "block_influence"], min_speedup=1.5, num_blocks=None)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert main(["jobs", "--url", url, "submit", "search", str(path)]) == 0
    cli_id = capsys.readouterr().out.strip().splitlines()[-1]
    with ShortenedClient(url) as client:
        submitted = client.submit_search(spec)
        assert submitted.kind == "search"
        for job_id in (cli_id, submitted.id):
            job = client.wait(job_id, timeout=300)
            assert job.status == "succeeded", job
            ranking = job.result["search"]["ranking"]
            assert all(12 / (12 - row["num_blocks"]) >= 1.5 for row in ranking)
            markdown = client.ranking(job_id, "markdown")
            assert markdown.splitlines()[2].startswith("| 1 | ")
            assert len(markdown.splitlines()) == 2 + len(ranking)
        assert client.ranking(cli_id) == client.get(cli_id).result["search"]
