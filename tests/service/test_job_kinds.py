"""A job kind is one row of the job-kind table: a kind added there (and nowhere else) is
submitted through its own route, refused by its own checks, planned by a dry run, batched,
run by the real worker code, and listed, on the real app and job store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from shortened.admission import Lookups, Problem
from shortened.kinds import JOB_KINDS, JobKind, job_kind, next_step, planned_kinds
from shortened.planning import Plan, StagePlan
from tests.e2e_service import TINY_MODEL
from tests.service.test_submission import Api, api_for  # noqa: F401 - the fixture
from worker.tasks import execute_job


class EchoSpec(BaseModel):
    """Writes ``words`` copies of ``word`` to ``echo.txt``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A model directory (checked like every kind's)")
    word: str = Field(default="hello", max_length=20)
    words: int = Field(default=3, ge=1, le=10)


def echo_problems(
    prefix: str, spec: BaseModel, lookups: Lookups, config: dict[str, Any] | None
) -> Iterator[Problem]:
    assert isinstance(spec, EchoSpec)
    if spec.words == 7 and config is not None:
        yield Problem(f"{prefix}words", f"7 echoes of a {config['model_type']} are unlucky")


def echo_plan(spec: BaseModel, config: dict[str, Any], auto_device: str) -> Plan:
    assert isinstance(spec, EchoSpec)
    layers = int(config["num_hidden_layers"])
    return Plan(
        kind="echo",
        model_type=str(config["model_type"]),
        num_layers=layers,
        device=auto_device,
        compute_dtype="float32",
        output_dtype="float32",
        params_before=0,
        params_after=0,
        block_params=0,
        weight_bytes=0,
        output_bytes=spec.words * len(spec.word),
        stages=[StagePlan("echo", 1000 * spec.words, "words")],
    )


def echo_engine(spec: EchoSpec, output_dir: Path, *, progress, store) -> dict[str, Any]:
    from shortened.engine.progress import Progress

    output_dir.mkdir(parents=True)
    for done in range(1, spec.words + 1):
        progress(Progress("echoing", done, spec.words, "words"))
    (output_dir / "echo.txt").write_text(" ".join([spec.word] * spec.words))
    report = {"echoed": spec.words}
    (output_dir / "report.json").write_text(json.dumps(report))
    return report


ECHO = JobKind(
    name="echo",
    spec=EchoSpec,
    summary="Echo a word (a test's kind).",
    engine="tests.service.test_job_kinds:echo_engine",
    check=echo_problems,
    plan=echo_plan,
)


@pytest.fixture
def echo_api(api_for, monkeypatch) -> Api:  # noqa: F811
    monkeypatch.setitem(JOB_KINDS, "echo", ECHO)  # before the app is made: it has the route
    return api_for(None)


def test_a_kind_added_as_one_row_is_submitted_planned_run_and_listed(echo_api: Api):
    api = echo_api
    body = {"model": str(TINY_MODEL), "word": "depth", "words": 4}
    assert "/jobs/echo" in api.client.get("/openapi.json").json()["paths"]

    planned = api.post("/jobs/echo?dry_run=true", body)
    assert planned.status_code == 200, planned.text
    plan = planned.json()["plan"]
    assert plan["kind"] == "echo" and plan["peak_bytes"] == 4000 and plan["num_layers"] == 12

    # Its own checks and its spec's bounds answer 422 with the field.
    unlucky = api.post("/jobs/echo", {**body, "words": 7})
    assert unlucky.status_code == 422
    assert unlucky.json()["detail"][0]["loc"] == ["body", "words"]
    assert "unlucky" in unlucky.json()["detail"][0]["msg"]
    assert api.post("/jobs/echo", {**body, "words": 11}).status_code == 422

    submitted = api.post("/jobs/echo", body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    batch = api.post("/jobs/batch", {"kind": "echo", "base": body, "grid": {"words": [1, 2]}})
    assert batch.status_code == 202, batch.text
    assert len(batch.json()["job_ids"]) == 2

    assert execute_job(job_id, api.settings) == "succeeded"
    job = api.client.get(f"/jobs/{job_id}", headers=api.headers).json()
    assert job["kind"] == "echo" and job["status"] == "succeeded"
    assert job["result"] == {"echoed": 4}
    assert {a["name"] for a in job["artifacts"]} >= {"echo.txt", "report.json"}

    listed = api.client.get("/jobs?kind=echo", headers=api.headers).json()
    assert {j["id"] for j in listed["items"]} == {job_id, *batch.json()["job_ids"]}
    unknown = api.client.get("/jobs?kind=nope", headers=api.headers)
    assert unknown.status_code == 422 and "unknown job kind" in unknown.text


def test_without_its_row_a_kind_is_unknown_everywhere(api_for):  # noqa: F811
    api = api_for(None)
    assert api.post("/jobs/echo", {"model": str(TINY_MODEL)}).status_code in (404, 405)
    refused = api.post("/jobs/batch", {"kind": "echo", "base": {}, "grid": {"words": [1]}})
    assert refused.status_code == 422 and "a batch's kind is one of" in refused.text
    with pytest.raises(KeyError, match="unknown job kind 'echo'"):
        job_kind("echo")


def test_pipeline_steps_come_from_the_table() -> None:
    prune = {
        "model": "models/m",
        "criterion": "magnitude",
        "num_blocks": 2,
        "retrain": {"method": "lora", "data": {"source": "d.jsonl"}, "max_steps": 1},
        "eval": {"perplexity": {"datasets": ["t.txt"]}},
    }
    assert planned_kinds("prune", prune) == ["prune", "retrain", "eval"]
    kind, retrain = next_step("prune", prune, [("prune", "p1")]) or ("", {})
    assert kind == "retrain" and retrain["model"] == "job://p1"
    kind, evaluation = next_step("prune", prune, [("prune", "p1"), ("retrain", "r1")]) or ("", {})
    assert kind == "eval" and evaluation["model"] == "job://r1"
    assert evaluation["compare_with"] == "job://p1"  # the pruned model, before retraining
    assert next_step("prune", prune, [("prune", "p1"), ("retrain", "r1"), ("eval", "e1")]) is None
    no_retrain = {k: v for k, v in prune.items() if k != "retrain"}
    kind, evaluation = next_step("prune", no_retrain, [("prune", "p1")]) or ("", {})
    assert evaluation["model"] == "job://p1" and evaluation["compare_with"] == "models/m"
