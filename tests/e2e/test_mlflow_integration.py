"""Jobs logged to MLflow, end to end: a real `mlflow server` (SQLite backend store, local
artifact root, on loopback) that the API and a real Celery worker are configured with;
prune jobs on models/tiny-llama, a prune -> eval pipeline, the model registry, a tracking
server that is down, and the run page in the MLflow UI (headless Chromium)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e_service import (
    REPO,
    Process,
    free_port,
    prune_spec,
    s3_stack,
    start_process,
    submit,
    wait_for_job,
    wait_until,
)
from worker.tracking import metric_name

pytestmark = pytest.mark.e2e

HELDOUT = REPO / "data" / "stdlib_docs_heldout.txt"
SCREENSHOT = REPO / "test-artifacts" / "mlflow-run.png"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """URL of a real MLflow tracking server with a SQLite backend and a local artifact root,
    serving artifacts itself (clients upload through it, as against a shared server)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    process: Process = start_process(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        dict(os.environ),
        root / "mlflow.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url), 180, "the MLflow server", process, interval=0.5)
        yield url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def stack(mlflow_server, s3_server, tmp_path_factory):
    down = f"http://127.0.0.1:{free_port()}"  # allowed, but nothing listens there
    settings = {
        "SHORTENED_MLFLOW_TRACKING_URI": mlflow_server,
        "SHORTENED_MLFLOW_EXPERIMENT": "e2e-default",
        "SHORTENED_MLFLOW_ALLOWED_TRACKING_URIS": json.dumps([down]),
        "SHORTENED_MLFLOW_REQUEST_TIMEOUT_S": "60",  # a busy test machine
        "SHORTENED_MLFLOW_REQUEST_RETRIES": "1",
    }
    root = tmp_path_factory.mktemp("mlflow-e2e")
    with s3_stack(s3_server, root, settings=settings) as stack:
        yield {**stack, "mlflow": mlflow_server, "down": down}


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server)


@pytest.fixture(scope="module")
def tracked_prune(stack):
    """A prune job logged to its own experiment and registered as a model."""
    api = stack["api"]
    tracking = {"mlflow": {"experiment": "e2e-prune", "register_as": "tiny-llama-pruned"}}
    job_id = submit(api, prune_spec(tracking=tracking))
    job = wait_for_job(api, job_id, worker=stack["worker"])
    assert job["status"] == "succeeded", job
    events = api.get(f"/jobs/{job_id}/events").json()
    assert "mlflow" in job["result"], [e["message"] for e in events if e["type"] == "warning"]
    return job


def test_prune_job_logs_params_block_scores_and_report(tracked_prune, client, tmp_path):
    job = tracked_prune
    info = job["result"]["mlflow"]
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "e2e-prune"
    params = run.data.params
    assert params["criterion"] == "ppl" and params["num_blocks"] == "2"
    assert params["calibration.n_samples"] == "4" and params["device"] == "cpu"
    assert params["tracking.mlflow.register_as"] == "tiny-llama-pruned"
    tags = run.data.tags
    assert tags["shortened.job_id"] == job["id"] and tags["shortened.kind"] == "prune"
    assert tags["shortened.tenant"] == "default" and tags["shortened.status"] == "succeeded"
    assert "mlflow.parentRunId" not in tags  # a plain job: no pipeline run

    # The block scores as a series indexed by block: exactly the report's numbers.
    scores = job["result"]["block_scores"]
    history = client.get_metric_history(run.info.run_id, "block_score")
    assert {m.step: m.value for m in history} == {
        block: pytest.approx(score) for block, score in enumerate(scores) if score is not None
    }
    assert len(history) >= 2
    assert run.data.metrics["params_removed_ratio"] == pytest.approx(
        job["result"]["params_removed_ratio"]
    )

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "block_scores.svg", "block_scores.csv"} <= names
    local = client.download_artifacts(run.info.run_id, "report.json", str(tmp_path))
    report = json.loads(Path(local).read_text())
    assert (
        report["block_scores"] == scores
        and report["removed_blocks"] == job["result"]["removed_blocks"]
    )


def test_register_as_creates_a_model_version_at_the_artifact_store(
    tracked_prune, client, stack, s3_server
):
    import boto3

    job = tracked_prune
    # Registered in the tenant's part of the registry (SHORTENED_MLFLOW_REGISTRY_SCOPE).
    assert client.search_model_versions("name='tiny-llama-pruned'") == []
    (version,) = client.search_model_versions("name='default.tiny-llama-pruned'")
    assert version.run_id == job["result"]["mlflow"]["run_id"]
    prefix = f"artifacts/jobs/{job['id']}"
    assert version.source == f"s3://{stack['bucket']}/{prefix}"
    assert version.tags["shortened.job_id"] == job["id"]
    registered = job["result"]["mlflow"]["registered_model"]
    assert registered["version"] == version.version
    assert registered["name"] == "default.tiny-llama-pruned"
    assert registered["source"] == f"job://{job['id']}"  # not the operator's store URL
    # The source holds the published checkpoint.
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=stack["bucket"], Prefix=prefix)["Contents"]}
    assert {f"{prefix}/config.json", f"{prefix}/model.safetensors"} <= keys


def test_pipeline_steps_nest_under_one_parent_run(stack, client):
    api = stack["api"]
    eval_section = {
        "perplexity": {"datasets": [str(HELDOUT)], "seq_len": 64, "max_windows": 4},
        "device": "cpu",
        "dtype": "float32",
    }
    tracking = {"mlflow": {"experiment": "e2e-pipeline"}}
    prune_id = submit(api, prune_spec(eval=eval_section, tracking=tracking))
    prune = wait_for_job(api, prune_id, worker=stack["worker"])
    assert prune["status"] == "succeeded", prune

    def eval_finished():
        pipeline = api.get(f"/jobs/{prune_id}").json()["pipeline"]
        return pipeline if pipeline["status"] in ("succeeded", "failed") else None

    pipeline = wait_until(eval_finished, 300, "the pipeline's eval step", stack["worker"])
    assert pipeline["status"] == "succeeded", pipeline
    eval_id = pipeline["jobs"][1]["id"]
    evaluation = api.get(f"/jobs/{eval_id}").json()

    prune_run = client.get_run(prune["result"]["mlflow"]["run_id"])
    eval_run = client.get_run(evaluation["result"]["mlflow"]["run_id"])
    parent_id = prune_run.data.tags["mlflow.parentRunId"]
    assert eval_run.data.tags["mlflow.parentRunId"] == parent_id
    assert prune_run.info.experiment_id == eval_run.info.experiment_id
    parent = client.get_run(parent_id)
    assert parent.data.tags["shortened.job_id"] == prune_id
    assert parent.info.status == "FINISHED"  # ended by the pipeline's last step
    # The parent's children, as MLflow's UI finds them.
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert {r.info.run_id for r in children} == {prune_run.info.run_id, eval_run.info.run_id}

    # The eval step's perplexity, as the report has it; the follow-up inherited the spec's
    # tracking section.
    perplexity = evaluation["result"]["model"]["perplexity"]
    assert perplexity
    for name, values in perplexity.items():
        logged = eval_run.data.metrics[metric_name("ppl", name)]
        assert math.isclose(logged, values["ppl"], rel_tol=1e-6)
    assert eval_run.data.tags["shortened.kind"] == "eval"
    assert eval_run.data.params["tracking.mlflow.experiment"] == "e2e-pipeline"


def test_unreachable_tracking_server_leaves_the_job_succeeded_with_a_warning(stack):
    api = stack["api"]
    tracking = {"mlflow": {"tracking_uri": stack["down"], "experiment": "nowhere"}}
    job_id = submit(api, prune_spec(tracking=tracking))
    job = wait_for_job(api, job_id, worker=stack["worker"])
    assert job["status"] == "succeeded", job
    assert "mlflow" not in job["result"]
    events = api.get(f"/jobs/{job_id}/events").json()
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert any(m.startswith("mlflow: starting the run on " + stack["down"]) for m in warnings), (
        warnings
    )
    assert any(e["message"].startswith("published") for e in events)


def test_a_tracking_server_the_server_does_not_allow_is_refused_at_submission(stack):
    api = stack["api"]
    for uri in ("http://169.254.169.254", "http://127.0.0.1:1"):
        spec = prune_spec(tracking={"mlflow": {"tracking_uri": uri, "experiment": "x"}})
        response = api.post("/jobs/prune", json=spec)
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"][-3:] == ["tracking", "mlflow", "tracking_uri"], error
        assert "not allowed" in error["msg"]
    bad = prune_spec(tracking={"mlflow": {"experiment": "x\nnewline"}})
    assert api.post("/jobs/prune", json=bad).status_code == 422


def test_the_run_page_in_the_mlflow_ui(tracked_prune, client, stack, browser):
    from selenium.webdriver.common.by import By

    run_id = tracked_prune["result"]["mlflow"]["run_id"]
    experiment_id = client.get_run(run_id).info.experiment_id
    browser.get(f"{stack['mlflow']}/#/experiments/{experiment_id}/runs/{run_id}")
    run_name = f"prune {tracked_prune['id']}"

    def rendered():
        text = browser.find_element(By.TAG_NAME, "body").text
        return run_name in text and "Parameters" in text

    wait_until(rendered, 90, "the MLflow run page", interval=1)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
