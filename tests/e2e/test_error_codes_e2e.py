"""Broken user input reaches the tenant as its own error code through a real worker (Celery
process, pool child, engine) and the API: a damaged weights file, undecodable calibration
data, a device the machine does not have. Never internal_error, and no server path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from tests.e2e_service import (
    CALIBRATION,
    TINY_MODEL,
    base_env,
    free_port,
    prune_spec,
    start_api,
    start_worker,
    submit,
    wait_for_job,
)

pytestmark = pytest.mark.e2e


def test_broken_input_fails_with_its_own_code_through_a_worker(tmp_path: Path):
    inputs = tmp_path / "inputs"
    damaged = inputs / "damaged-model"
    shutil.copytree(TINY_MODEL, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    undecodable = inputs / "calibration.jsonl"
    undecodable.write_bytes(b"\xff\xfe" + "caf\xe9\n".encode("latin-1") * 100)
    cases = {
        "corrupt_model": prune_spec(model=str(damaged)),
        "bad_calibration_data": prune_spec(calibration={"source": str(undecodable)}),
        "device_unavailable": prune_spec(device=f"cuda:{torch.cuda.device_count()}"),
    }
    env = base_env(
        {
            "SHORTENED_DATA_DIR": str(tmp_path / "var"),
            "SHORTENED_WORKER_METRICS_PORT": "0",
            # Declared GPU workers: admission lets a CUDA device through, and the worker,
            # which has no such device, fails the job with device_unavailable.
            "SHORTENED_WORKER_DEVICE": "cuda",
            "SHORTENED_ALLOWED_LOCAL_ROOTS": json.dumps(
                [str(inputs), str(TINY_MODEL.parent), str(CALIBRATION.parent)]
            ),
        }
    )
    worker = start_worker(env, "gpu", tmp_path / "worker.log")
    api_process, url = start_api(env, free_port(), tmp_path / "api.log")
    try:
        with httpx.Client(base_url=url, timeout=30) as api:
            jobs = {code: submit(api, spec) for code, spec in cases.items()}
            for code, job_id in jobs.items():
                job = wait_for_job(api, job_id, worker=worker)
                assert job["status"] == "failed", job
                assert job["error"]["code"] == code, job["error"]
                assert str(tmp_path / "var") not in job["error"]["message"], job["error"]
    finally:
        api_process.stop()
        worker.stop(timeout=60)
