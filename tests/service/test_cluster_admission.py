"""Admission of multi-node retrain jobs: refused with their own error type when this server
has no cluster engine for them, accepted when it has; alone and as a pipeline's section."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.db import upgrade_database
from service.main import create_app
from shortened.config import Settings

RETRAIN = {
    "model": "models/tiny-llama",
    "data": {"source": "data/alpaca_tiny.jsonl"},
    "max_steps": 1,
}


def retrain(**distributed) -> dict:
    return {**RETRAIN, "distributed": {"nnodes": 2, "nproc_per_node": 2, **distributed}}


def client_for(tmp_path: Path, **settings) -> TestClient:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade_database(url)
    return TestClient(create_app(Settings(data_dir=tmp_path / "var", database_url=url, **settings)))


KUBEFLOW = {
    "kubeflow_runtime": "torch-distributed",
    "kubeflow_image": "registry.example/shortened-worker:1",
    "artifacts_url": "s3://bucket/artifacts",
}


@pytest.mark.parametrize(
    ("settings", "body", "message"),
    [
        ({}, retrain(), "kubeflow engine is not configured on this server"),
        (KUBEFLOW, retrain(engine="ray"), "ray engine is not configured on this server"),
        (
            {**KUBEFLOW, "artifacts_url": None},
            retrain(),
            "kubeflow engine needs an s3:// artifact store",
        ),
    ],
)
def test_a_cluster_engine_this_server_lacks_is_refused(
    tmp_path: Path, settings: dict, body: dict, message: str
) -> None:
    with client_for(tmp_path, **settings) as client:
        for path in ("/jobs/retrain", "/jobs/retrain?dry_run=true"):
            response = client.post(path, json=body)
            assert response.status_code == 422, response.text
            [error] = response.json()["detail"]
            assert error["loc"] == ["body", "distributed", "engine"]
            assert error["type"] == "cluster_engine_not_configured"
            assert message in error["msg"]
        # In a pipeline: the prune job's retrain section is refused the same way.
        prune = {
            "model": "models/tiny-llama",
            "num_blocks": 2,
            "calibration": {"source": "data/calibration.jsonl", "n_samples": 4},
            "retrain": {key: value for key, value in body.items() if key != "model"},
        }
        [error] = client.post("/jobs/prune", json=prune).json()["detail"]
        assert error["loc"] == ["body", "retrain", "distributed", "engine"]
        assert error["type"] == "cluster_engine_not_configured"


def test_one_machine_needs_no_cluster_and_a_configured_one_is_accepted(tmp_path: Path) -> None:
    with client_for(tmp_path) as client:
        one_node = {**RETRAIN, "distributed": {"nproc_per_node": 2}}
        assert client.post("/jobs/retrain?dry_run=true", json=one_node).status_code == 200
    with client_for(tmp_path / "kubeflow", **KUBEFLOW) as client:
        accepted = client.post("/jobs/retrain?dry_run=true", json=retrain())
        assert accepted.status_code == 200, accepted.text
        # The number of GPUs each node asks the cluster for cannot be "whatever it has".
        [error] = client.post("/jobs/retrain", json=retrain(nproc_per_node="auto")).json()["detail"]
        assert error["loc"] == ["body", "distributed", "nproc_per_node"]
