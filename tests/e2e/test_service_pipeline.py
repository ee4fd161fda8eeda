"""Retrain and eval jobs, and prune -> retrain -> eval pipelines, end to end: HTTP API
(uvicorn subprocess) -> PostgreSQL -> Redis -> real Celery worker -> engine on
models/tiny-llama -> S3 (moto) artifacts."""

from __future__ import annotations

import math

import httpx
import pytest

from tests.e2e_service import (
    REPO,
    TINY_MODEL,
    prune_spec,
    s3_stack,
    submit,
    wait_for_job,
    wait_until,
)

TRAIN = REPO / "data" / "stdlib_docs_train.jsonl"
HELDOUT = REPO / "data" / "stdlib_docs_heldout.txt"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    (root / "data").mkdir()
    with s3_stack(s3_server, root, [REPO, root / "data"]) as stack:
        yield {**stack, "data": root / "data"}


def retrain_section(**overrides) -> dict:
    spec = {
        "method": "lora",
        "data": {"source": str(TRAIN), "format": "text", "max_records": 32},
        "lora": {"r": 4, "alpha": 8},
        "max_steps": 4,
        "micro_batch_size": 2,
        "batch_size": 2,
        "cutoff_len": 64,
        "warmup_steps": 0,
        "logging_steps": 1,
        "learning_rate": 1e-4,
        "device": "cpu",
        "dtype": "float32",
    }
    spec.update(overrides)
    return spec


def eval_section(**overrides) -> dict:
    spec = {
        "perplexity": {"datasets": [str(HELDOUT)], "seq_len": 64, "max_windows": 4},
        "device": "cpu",
        "dtype": "float32",
    }
    spec.update(overrides)
    return spec


def post(api: httpx.Client, kind: str, spec: dict) -> httpx.Response:
    return api.post(f"/jobs/{kind}", json=spec)


def submitted(api: httpx.Client, kind: str, spec: dict) -> str:
    response = post(api, kind, spec)
    assert response.status_code == 202, response.text
    assert response.json()["kind"] == kind
    return response.json()["id"]


def artifact_names(job: dict) -> set[str]:
    return {a["name"] for a in job["artifacts"]}


def test_bad_specs_are_422_naming_the_field(stack):
    api = stack["api"]
    model = str(TINY_MODEL)
    cases = [
        ("retrain", {"model": model, **retrain_section(lora={"r": 0})}, ["lora", "r"]),
        ("retrain", {"model": model, **retrain_section(method="dpo")}, ["method"]),
        ("retrain", {"model": model, **retrain_section(batch_size=3)}, ["batch_size"]),
        ("eval", {"model": model, "device": "cpu"}, []),
        ("eval", {"model": model, **eval_section(perplexity={"seq_len": 1})}, ["perplexity"]),
        (
            "prune",
            prune_spec(retrain={"model": model, **retrain_section()}),
            ["retrain", "model"],
        ),
        ("prune", prune_spec(eval={"perplexity": {"max_windows": 0}}), ["eval", "perplexity"]),
    ]
    for kind, spec, loc in cases:
        response = post(api, kind, spec)
        assert response.status_code == 422, (kind, spec, response.text)
        locs = [e["loc"][1:] for e in response.json()["detail"]]
        assert any(got[: len(loc)] == loc for got in locs), (loc, locs)


def test_retrain_job_publishes_adapter_and_merged_model(stack):
    api = stack["api"]
    job_id = submitted(api, "retrain", {"model": str(TINY_MODEL), **retrain_section()})
    job = wait_for_job(api, job_id, worker=stack["worker"], timeout=180)
    assert job["status"] == "succeeded", job
    names = artifact_names(job)
    assert {"config.json", "model.safetensors", "adapter/adapter_config.json"} <= names, names
    assert any(n.startswith("adapter/adapter_model") for n in names), names
    assert job["pipeline"] is None


def test_eval_job_perplexity_matches_a_direct_computation(stack):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    api = stack["api"]
    job_id = submitted(api, "eval", {"model": str(TINY_MODEL), **eval_section()})
    job = wait_for_job(api, job_id, worker=stack["worker"], timeout=120)
    assert job["status"] == "succeeded", job
    assert "report.json" in artifact_names(job)
    ppl = job["result"]["model"]["perplexity"][str(HELDOUT)]["ppl"]

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, torch_dtype=torch.float32).eval()
    ids = tokenizer(HELDOUT.read_text(), return_tensors="pt").input_ids[0]
    assert ids[0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        losses = [
            model(input_ids=w[None], labels=w[None]).loss.item()
            for w in (ids[i * 64 : (i + 1) * 64] for i in range(4))
        ]
    assert ppl == pytest.approx(math.exp(sum(losses) / 4), rel=1e-4)


def test_engine_errors_fail_the_job_with_their_code(stack):
    api = stack["api"]
    # An empty file is knowable at the door: 422 naming the field, no job.
    empty = stack["data"] / "empty.jsonl"
    empty.write_text("")
    refused = post(
        api, "retrain", {"model": str(TINY_MODEL), **retrain_section(data={"source": str(empty)})}
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["loc"] == ["body", "data", "source"]
    # Records without the text the format needs are found only by reading them: the worker.
    unusable = stack["data"] / "unusable.jsonl"
    unusable.write_text("".join(f'{{"id": {i}}}\n' for i in range(20)))
    retrain_id = submitted(
        api,
        "retrain",
        {"model": str(TINY_MODEL), **retrain_section(data={"source": str(unusable)})},
    )
    eval_id = submitted(
        api,
        "eval",
        {"model": str(TINY_MODEL), "zero_shot": {"tasks": ["no_such_task_xyz"]}, "device": "cpu"},
    )
    job = wait_for_job(api, retrain_id, worker=stack["worker"], timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "bad_data", job
    assert job["attempts"] == 1
    job = wait_for_job(api, eval_id, worker=stack["worker"], timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "eval_task_not_found", job
    assert job["attempts"] == 1


def test_prune_retrain_eval_pipeline(stack):
    api, worker = stack["api"], stack["worker"]
    prune_id = submit(api, prune_spec(retrain=retrain_section(), eval=eval_section()))
    first = api.get(f"/jobs/{prune_id}").json()
    assert first["pipeline"]["pending"] == ["retrain", "eval"]

    def finished_pipeline():
        job = api.get(f"/jobs/{prune_id}").json()
        pipeline = job["pipeline"]
        return job if pipeline["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_until(finished_pipeline, 300, "the pipeline to finish", worker, interval=0.5)
    pipeline = job["pipeline"]
    assert pipeline["status"] == "succeeded", pipeline
    assert pipeline["pending"] == [] and pipeline["current"] is None
    kinds = [(s["kind"], s["status"]) for s in pipeline["jobs"]]
    assert kinds == [("prune", "succeeded"), ("retrain", "succeeded"), ("eval", "succeeded")]
    prune, retrain, evaluation = pipeline["jobs"]
    assert prune["id"] == prune_id and prune["parent_id"] is None
    assert retrain["parent_id"] == prune_id and evaluation["parent_id"] == retrain["id"]

    retrain_job = api.get(f"/jobs/{retrain['id']}").json()
    assert retrain_job["spec"]["model"] == f"job://{prune_id}"
    assert retrain_job["pipeline"]["jobs"] == pipeline["jobs"]
    eval_job = api.get(f"/jobs/{evaluation['id']}").json()
    assert eval_job["spec"]["model"] == f"job://{retrain['id']}"
    assert eval_job["spec"]["compare_with"] == f"job://{prune_id}"
    result = eval_job["result"]
    assert math.isfinite(result["model"]["perplexity"][str(HELDOUT)]["ppl"])
    assert "baseline" in result, result.keys()
