"""Admission of multi-process retraining against what the workers declare: more processes per
node than any worker has devices is refused as ``insufficient_devices``; a retrain no worker
can hold is refused as ``insufficient_memory`` naming the devices its training would need;
one that fits per device when spread is accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from shortened.config import Settings
from shortened.kinds import parse_spec, plan_job
from shortened.retrain_memory import spread_over

TINY = Path(__file__).parents[2] / "models" / "tiny-llama"


def retrain(processes: int | str = 1) -> dict:
    return {
        "model": "models/tiny-llama",
        "method": "cpt",
        "data": {"source": "data/stdlib_docs_train.jsonl"},
        "cpt": {"max_steps": 2, "seq_len": 64},
        "distributed": {"nproc_per_node": processes, "strategy": "fsdp"},
    }


def per_device_peak(processes: int) -> int:
    """The planner's per-device training peak of ``retrain`` on CUDA workers."""
    config = json.loads((TINY / "config.json").read_text())
    parsed = spread_over(parse_spec("retrain", retrain()), processes)
    plan = plan_job("retrain", parsed, config, "cuda")
    assert plan is not None
    return max(stage.peak_bytes for stage in plan.stages if stage.per_device)


@pytest.fixture
def two_device_workers(database_url: str, tmp_path: Path):
    """CUDA workers of two devices each, each device holding what three FSDP ranks need
    per device, less than two do: a one-process or two-process CPT does not fit."""
    per_device = per_device_peak(3)
    assert per_device < per_device_peak(2)
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        worker_device="cuda",
        max_worker_memory_gb=per_device / 10**9,
        max_worker_devices=2,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def errors(response) -> list[dict]:
    assert response.status_code == 422, response.text
    return response.json()["detail"]


def test_more_processes_than_devices_is_refused_with_its_own_type(two_device_workers) -> None:
    [error] = errors(two_device_workers.post("/jobs/retrain?dry_run=true", json=retrain(4)))
    assert error["type"] == "insufficient_devices"
    assert error["loc"] == ["body", "distributed", "nproc_per_node"]
    assert "4 training processes" in error["msg"] and "2 device(s)" in error["msg"]


def test_a_retrain_too_large_says_how_many_devices_would_hold_it(two_device_workers) -> None:
    for processes in (1, 2, "auto"):  # auto: one per device of the largest worker, 2
        [error] = errors(
            two_device_workers.post("/jobs/retrain?dry_run=true", json=retrain(processes))
        )
        assert error["type"] == "insufficient_memory"
        assert "fit 3 devices of this size" in error["msg"]
        assert "{nproc_per_node: 3, strategy: fsdp}" in error["msg"]


def test_a_retrain_that_fits_per_device_when_spread_is_planned_per_device(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        worker_device="cuda",
        max_worker_memory_gb=per_device_peak(2) / 10**9,
        max_worker_devices=2,
    )
    with TestClient(create_app(settings)) as client:
        planned = client.post("/jobs/retrain?dry_run=true", json=retrain(2))
        assert planned.status_code == 200, planned.text
        plan = planned.json()["plan"]
        assert (plan["processes"], plan["strategy"]) == (2, "fsdp")
        assert plan["stages"][-1]["per_device"] is True
        assert errors(client.post("/jobs/retrain?dry_run=true", json=retrain(1)))
