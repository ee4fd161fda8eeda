"""End to end: HTTP API (uvicorn subprocess) -> PostgreSQL job store -> Redis broker ->
real Celery worker subprocess -> real engine on models/tiny-llama -> S3 (moto) artifacts.

One worker and one API process serve every test of the module; each job still runs in a
fresh worker child (worker_max_tasks_per_child=1), as in production.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e_service import (
    CALIBRATION,
    FINISHED,
    TINY_MODEL,
    base_env,
    download_artifacts,
    failing_in_worker_spec,
    free_port,
    generate,
    message_ignored,
    prune_spec,
    s3_stack,
    stage_history,
    start_process,
    submit,
    wait_for_job,
    wait_until,
)

pytestmark = pytest.mark.e2e

ENGINE_STAGES = ["loading", "calibration", "scoring", "quality_gate", "pruning", "saving"]


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    """API + worker against Redis, PostgreSQL and S3, each namespaced for this module; API
    and worker share nothing but the database, broker and bucket."""
    with s3_stack(s3_server, tmp_path_factory.mktemp("e2e")) as stack:
        yield stack


def s3_keys(stack, job_id: str) -> list[str]:
    response = stack["s3"].list_objects_v2(
        Bucket=stack["bucket"], Prefix=f"artifacts/jobs/{job_id}/"
    )
    return [obj["Key"] for obj in response.get("Contents", [])]


def test_readyz_reports_all_components(stack):
    response = stack["api"].get("/readyz")
    assert response.status_code == 200, response.text
    assert all(c["ok"] for c in response.json()["components"].values())


def test_prune_job_publishes_a_loadable_checkpoint(stack, tmp_path: Path):
    api, worker = stack["api"], stack["worker"]
    job_id = submit(api, prune_spec())
    job = wait_for_job(api, job_id, worker=worker)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and job["error"] is None
    assert job["started_at"] <= job["finished_at"]

    result = job["result"]
    assert result["criterion"] == "ppl" and len(result["removed_blocks"]) == 2
    assert result["num_layers_after"] == result["num_layers_before"] - 2
    assert result["params_after"] < result["params_before"]
    assert sorted(result["kept_blocks"] + result["removed_blocks"]) == list(
        range(result["num_layers_before"])
    )

    # Stage history, in order, then the worker's own publishing stage.
    assert stage_history(api, job_id) == ENGINE_STAGES + ["publishing"]
    statuses = [
        e["data"]["status"]
        for e in api.get(f"/jobs/{job_id}/events").json()
        if e["type"] == "status"
    ]
    assert statuses == ["queued", "running", "succeeded"]

    # Every artifact through its presigned URL, checked against the manifest in the bucket.
    links = download_artifacts(api, job_id, tmp_path / "model")
    assert all(link["url"].startswith("http") and "Signature" in link["url"] for link in links)
    manifest = json.loads(
        stack["s3"]
        .get_object(Bucket=stack["bucket"], Key=f"artifacts/jobs/{job_id}/manifest.json")["Body"]
        .read()
    )
    assert {(f["name"], f["size"], f["sha256"]) for f in manifest["files"]} == {
        (link["name"], link["size"], link["sha256"]) for link in links
    }
    names = {link["name"] for link in links}
    assert {"config.json", "model.safetensors", "report.json", "block_scores.csv"} <= names
    assert job["artifacts"] == [
        {"name": f["name"], "size": f["size"], "sha256": f["sha256"]} for f in manifest["files"]
    ]
    report = json.loads((tmp_path / "model" / "report.json").read_text())
    assert report["removed_blocks"] == result["removed_blocks"]
    # The API's result has no library versions or server paths; the artifact keeps the record.
    assert "versions" in report and "versions" not in result
    from shortened.redact import spec_strings

    own = spec_strings(job["spec"])
    leaked = [s for s in spec_strings(result) if s.startswith("/") and s not in own]
    assert leaked == [], leaked

    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == result["num_layers_after"]
    assert generate(tmp_path / "model")

    # A redelivered message for a finished job is a no-op.
    from shortened.config import Settings
    from worker.celery_app import RUN_JOB_TASK, make_celery

    events_before = api.get(f"/jobs/{job_id}/events").json()
    producer = make_celery(
        Settings(broker_url=stack["broker_url"], queue=stack["queue"], data_dir=tmp_path)
    )
    producer.send_task(RUN_JOB_TASK, args=[job_id])
    wait_until(lambda: message_ignored(worker.log(), job_id), 60, "the duplicate message", worker)
    assert api.get(f"/jobs/{job_id}").json()["attempts"] == 1
    assert api.get(f"/jobs/{job_id}/events").json() == events_before


def test_cancel_running_job(stack):
    api, worker = stack["api"], stack["worker"]
    # Slow on purpose, in many short steps: iterative perplexity re-scores every candidate
    # block in each of 4 rounds (10 + 9 + 8 + 7 block evaluations), checking for a cancel
    # after each one.
    spec = prune_spec(
        criterion="iterative_ppl",
        num_blocks=4,
        protect_first=1,
        protect_last=1,
        calibration={"source": str(CALIBRATION), "n_samples": 32},
    )
    job_id = submit(api, spec)

    def scoring_started():
        job = api.get(f"/jobs/{job_id}").json()
        in_scoring = job["stage"] == "scoring" and job["progress"]["done"] >= 1
        return job if in_scoring or job["status"] in FINISHED else None

    job = wait_until(scoring_started, 300, "scoring to start", worker, interval=0.1)
    assert job["status"] == "running", job

    # A second job waits in the queue behind it (one job per worker, prefetch 1): cancelling
    # it is immediate, and when its message is delivered the worker does nothing with it.
    queued_id = submit(api, prune_spec())
    response = api.post(f"/jobs/{queued_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"

    response = api.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 202, response.text
    assert response.json()["cancel_requested"] is True
    job = wait_for_job(api, job_id, timeout=120, worker=worker)
    assert job["status"] == "cancelled", job
    assert job["result"] is None and job["artifacts"] is None and job["error"] is None

    events = api.get(f"/jobs/{job_id}/events").json()
    assert stage_history(api, job_id) == ["loading", "calibration", "scoring"]
    scored = [e for e in events if e["type"] == "metric"]
    assert 1 <= len(scored) < 34  # stopped part-way through scoring
    messages = [e["message"] for e in events if e["type"] == "status"]
    assert messages[-2:] == ["cancel requested", "cancelled"]

    assert s3_keys(stack, job_id) == []  # nothing published, not even a partial upload
    assert api.get(f"/jobs/{job_id}/artifacts").status_code == 409
    assert list((stack["worker_dir"] / "tmp").iterdir()) == []  # temp output removed
    assert api.post(f"/jobs/{job_id}/cancel").status_code == 409

    wait_until(
        lambda: message_ignored(worker.log(), queued_id),
        60,
        "the cancelled job's message",
        worker,
    )
    queued = api.get(f"/jobs/{queued_id}").json()
    assert (
        queued["status"] == "cancelled" and queued["attempts"] == 0 and queued["started_at"] is None
    )


def test_missing_model_is_refused_and_a_bad_job_fails_with_its_code(stack):
    api = stack["api"]
    # A missing model is knowable at the door: 422 naming the field, no job.
    refused = api.post("/jobs/prune", json=prune_spec(model=str(TINY_MODEL.parent / "no-such")))
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["loc"] == ["body", "model"]
    # One that fails only in the worker fails with its own code and publishes nothing.
    job_id = submit(api, failing_in_worker_spec())
    job = wait_for_job(api, job_id, worker=stack["worker"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "bad_calibration_data" and "4096" in job["error"]["message"]
    assert s3_keys(stack, job_id) == []
    assert api.get(f"/jobs/{job_id}/artifacts").status_code == 409
    listed = api.get("/jobs", params={"status": "failed"}).json()["items"]
    assert job_id in [j["id"] for j in listed]


def test_embedded_serve(tmp_path: Path):
    """`serve` with the defaults: SQLite, filesystem broker, local artifacts streamed by the API."""
    port = free_port()
    env = base_env({"SHORTENED_DATA_DIR": str(tmp_path / "var"), "SHORTENED_API_PORT": str(port)})
    process = start_process(
        [sys.executable, "-c", "from service.serve import serve; serve()"],
        env,
        tmp_path / "serve.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30) as api:
            wait_until(lambda: _ok(api, "/readyz"), 90, "serve", process)
            job_id = submit(api, prune_spec())
            job = wait_for_job(api, job_id, worker=process)
            assert job["status"] == "succeeded", (job, process.log()[-3000:])
            links = download_artifacts(api, job_id, tmp_path / "model")
            assert all(link["url"].startswith(f"/jobs/{job_id}/artifacts/") for link in links)
            assert generate(tmp_path / "model")
    finally:
        process.popen.send_signal(signal.SIGTERM)
        process.popen.wait(timeout=60)
    assert process.popen.returncode in (0, 128 + signal.SIGTERM), process.log()[-3000:]
    # serve stops its worker subprocess (and the worker its pool) before exiting; what is
    # left may only be on its way out (multiprocessing's resource tracker exits once the
    # supervisor's end of its pipe closes), never still running seconds later.
    marker = f"SHORTENED_DATA_DIR={tmp_path / 'var'}"
    deadline = time.monotonic() + 10
    while (left := _processes_with_env(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, ([_cmdline(pid) for pid in left], process.log()[-3000:])


def _ok(api: httpx.Client, path: str) -> bool:
    try:
        return api.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"{pid} (gone)"


def _processes_with_env(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found
