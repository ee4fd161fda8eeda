"""``magnitude`` scores blocks from the weights alone: a prune needs no calibration data, in
the spec (the API's validation), the service API, the CLI and the engine. Every other criterion
still refuses to run without data and says why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.db import upgrade_database
from service.main import create_app
from shortened.config import Settings
from shortened.engine.prune import prune_model
from shortened.specs import CRITERIA, PruneSpec
from tests.helpers import REPO, TINY_MODEL, save_tiny, tiny_model

NEEDS_DATA = [c for c in CRITERIA if c != "magnitude"]


def test_spec_accepts_magnitude_without_calibration():
    spec = PruneSpec(model="models/tiny-llama", criterion="magnitude", num_blocks=2)
    assert spec.calibration is None


@pytest.mark.parametrize("criterion", NEEDS_DATA)
def test_spec_refuses_other_criteria_without_calibration(criterion):
    with pytest.raises(ValidationError, match=f"criterion '{criterion}' needs calibration data"):
        PruneSpec(model="models/tiny-llama", criterion=criterion, num_blocks=2)


def test_service_api_accepts_magnitude_and_explains_the_others(tmp_path):
    settings = Settings(data_dir=tmp_path / "var")
    upgrade_database(settings)
    body = {"model": "models/tiny-llama", "num_blocks": 2}
    with TestClient(create_app(settings)) as client:
        accepted = client.post("/jobs/prune", json={**body, "criterion": "magnitude"})
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["spec"]["calibration"] is None
        refused = client.post("/jobs/prune", json={**body, "criterion": "taylor"})
        assert refused.status_code == 422, refused.text
        assert "needs calibration data" in json.dumps(refused.json())


def test_engine_prunes_by_magnitude_without_data(tmp_path):
    save_tiny(tiny_model("llama", num_layers=6), tmp_path / "model")
    spec = PruneSpec(
        model=str(tmp_path / "model"),
        criterion="magnitude",
        num_blocks=1,
        protect_first=1,
        protect_last=1,
    )
    report = prune_model(spec, tmp_path / "out")
    assert report["calibration"] is None and report["num_layers_after"] == 5
    assert json.loads((tmp_path / "out" / "report.json").read_text())["calibration"] is None


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shortened.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_cli_magnitude_without_calibration(tmp_path: Path):
    base = ["prune", "--model", str(TINY_MODEL), "--num-blocks", "2"]
    ok = run_cli(*base, "--criterion", "magnitude", "--output", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["calibration"] is None
    refused = run_cli(*base, "--criterion", "ppl", "--output", str(tmp_path / "o2"))
    assert refused.returncode == 2
    assert (
        "criterion 'ppl' needs calibration data" in refused.stderr
        and "--calibration" in refused.stderr
    )
    assert not (tmp_path / "o2").exists()
