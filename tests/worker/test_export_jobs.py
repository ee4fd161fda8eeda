"""Export is a job kind like the others: ``POST /jobs/export`` and a prune pipeline's
``export`` section are admitted, run by the real worker code, verified in llama.cpp and
published with the manifest; a target the model's family cannot have is a 422 naming it."""

from __future__ import annotations

import pytest

from tests.e2e_service import TINY_MODEL
from tests.service.test_submission import Api, api_for  # noqa: F401 - the fixture
from worker.tasks import execute_job

REPO = TINY_MODEL.parents[1]
HELDOUT = str(REPO / "data" / "stdlib_docs_heldout.txt")
PERPLEXITY = {"datasets": [HELDOUT], "max_windows": 8}


def job(api: Api, job_id: str) -> dict:
    return api.client.get(f"/jobs/{job_id}", headers=api.headers).json()


@pytest.fixture
def database_url(tmp_path) -> str:
    """The embedded job store only: the job kind's path is the same on PostgreSQL (the
    store's own tests run on both) and an export is minutes of llama.cpp work."""
    from service.db import upgrade_database

    (tmp_path / "var").mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path / 'var' / 'shortened.db'}"
    upgrade_database(url)
    return url


@pytest.fixture
def api(api_for) -> Api:  # noqa: F811
    return api_for(None)


def test_an_export_job_publishes_verified_gguf_files(api: Api) -> None:
    body = {
        "model": str(TINY_MODEL),
        "targets": [{"format": "gguf", "type": "q8_0"}],
        "perplexity": PERPLEXITY,
    }
    planned = api.post("/jobs/export?dry_run=true", body)
    assert planned.status_code == 200 and planned.json()["plan"]["kind"] == "export"
    submitted = api.post("/jobs/export", body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert execute_job(job_id, api.settings) == "succeeded"
    done = job(api, job_id)
    names = {a["name"]: a for a in done["artifacts"]}
    assert (
        "gguf-q8_0/model-q8_0.gguf" in names
        and len(names["gguf-q8_0/model-q8_0.gguf"]["sha256"]) == 64
    )
    [target] = done["result"]["targets"]
    assert target["name"] == "gguf-q8_0" and target["verified_by"].startswith("llama.cpp")
    assert target["ppl"] <= target["ppl_unquantized"] * 1.02
    page = api.client.get(f"/jobs/{job_id}/report", headers=api.headers).text
    assert 'id="export"' in page and 'data-name="gguf-q8_0"' in page and "llama.cpp" in page


def test_unsupported_targets_are_refused_at_the_door(api: Api) -> None:
    unknown = api.post(
        "/jobs/export", {"model": str(TINY_MODEL), "targets": [{"format": "gguf", "type": "q3"}]}
    )
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["loc"][:3] == ["body", "targets", 0]
    uncalibrated = api.post(
        "/jobs/export",
        {"model": str(TINY_MODEL), "targets": [{"format": "hf-quantized", "scheme": "w4a16"}]},
    )
    assert uncalibrated.status_code == 422 and "calibration" in uncalibrated.text
    nested = {
        "model": str(TINY_MODEL),
        "criterion": "magnitude",
        "num_blocks": 2,
        "retrain": {"method": "lora", "data": {"source": str(REPO / "data" / "alpaca_tiny.jsonl")},
                    "export": {"targets": [{"format": "gguf", "type": "f16"}]}},
    }  # fmt: skip
    refused = api.post("/jobs/prune", nested)
    assert refused.status_code == 422 and "top level" in refused.text


def test_prune_retrain_export_runs_as_one_pipeline(api: Api) -> None:
    body = {
        "model": str(TINY_MODEL),
        "criterion": "magnitude",
        "num_blocks": 3,
        "retrain": {
            "method": "lora",
            "data": {"source": str(REPO / "data" / "alpaca_tiny.jsonl")},
            "max_steps": 2,
            "warmup_steps": 0,
            "batch_size": 4,
            "micro_batch_size": 4,
        },
        "export": {"targets": [{"format": "gguf", "type": "f16"}], "perplexity": PERPLEXITY},
    }
    prune_id = api.post("/jobs/prune", body).json()["id"]
    assert execute_job(prune_id, api.settings) == "succeeded"
    [retrain_id] = [
        j["id"] for j in job(api, prune_id)["pipeline"]["jobs"] if j["kind"] == "retrain"
    ]
    assert execute_job(retrain_id, api.settings) == "succeeded"
    [export_id] = [j["id"] for j in job(api, prune_id)["pipeline"]["jobs"] if j["kind"] == "export"]
    spec = job(api, export_id)["spec"]
    # The retrained model is exported, beside the unpruned parent.
    assert spec["model"] == f"job://{retrain_id}" and spec["compare_with"] == str(TINY_MODEL)
    assert execute_job(export_id, api.settings) == "succeeded"
    [target] = job(api, export_id)["result"]["targets"]
    # The parent measured in the same runtime and type: 12 blocks against 9.
    assert target["ppl_parent"] is not None and target["tokens_per_s_parent"] > 0
    assert job(api, prune_id)["pipeline"]["status"] == "succeeded"


def test_a_gguf_source_is_pruned_and_published_in_its_own_quantization(
    api_for,  # noqa: F811
    tmp_path,
) -> None:
    """GGUF in -> prune -> ``gguf:source`` out through the API: admission reads the file's
    metadata (a target beyond its blocks is a 422), the worker dequantizes it, and the export
    section publishes the source's Q8_0 tensors with 3 blocks dropped, verified in llama.cpp
    beside the source file itself."""
    from shortened.engine.export.converter import convert
    from shortened.engine.export.gguf_export import quantize_gguf
    from tests.engine.export_models import tiny_llama

    convert(tiny_llama(tmp_path / "hf"), tmp_path / "tiny-f16.gguf", "f16")
    source = tmp_path / "tiny.Q8_0.gguf"
    quantize_gguf(tmp_path / "tiny-f16.gguf", source, "Q8_0")
    api = api_for(None, allowed_local_roots=[REPO, tmp_path])
    body = {
        "model": str(source),
        "criterion": "magnitude",
        "num_blocks": 3,
        "export": {"targets": ["gguf:source"], "perplexity": PERPLEXITY},
    }
    too_many = api.post("/jobs/prune", {**body, "num_blocks": 11})
    assert too_many.status_code == 422 and "12 blocks" in too_many.text
    retrained = api.post(
        "/jobs/prune",
        {**body, "retrain": {"method": "lora", "data": {"source": HELDOUT}}},
    )
    assert retrained.status_code == 422
    assert retrained.json()["detail"][0]["loc"] == ["body", "export", "targets", 0]

    prune_id = api.post("/jobs/prune", body).json()["id"]
    assert execute_job(prune_id, api.settings) == "succeeded"
    [export_id] = [j["id"] for j in job(api, prune_id)["pipeline"]["jobs"] if j["kind"] == "export"]
    assert execute_job(export_id, api.settings) == "succeeded"
    done = job(api, export_id)
    [target] = done["result"]["targets"]
    assert target["name"] == "gguf-source" and target["passed"]
    assert target["parent_as"] == "the source GGUF (llama.cpp)" and target["ppl_ratio"] < 1.02
    names = {a["name"] for a in done["artifacts"]}
    assert "gguf-source/model-q8_0.gguf" in names
