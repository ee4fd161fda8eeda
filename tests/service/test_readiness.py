"""/readyz tells the truth about the artifact store: a store that cannot take a write, or
has less free space than the configured floor, is not ready (503)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from service.db import upgrade_database
from service.main import create_app
from shortened.config import Settings


def readyz(settings: Settings) -> tuple[int, dict]:
    upgrade_database(settings)
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
        return response.status_code, response.json()["components"]


def test_ready_with_room_to_spare(tmp_path: Path):
    status, components = readyz(Settings(data_dir=tmp_path / "var", min_free_disk_gb=0.001))
    assert status == 200 and components["storage"] == {"ok": True, "error": None}


def test_not_ready_below_the_free_space_floor(tmp_path: Path):
    free_gb = shutil.disk_usage(tmp_path).free / 1e9
    settings = Settings(data_dir=tmp_path / "var", min_free_disk_gb=round(free_gb * 10 + 1))
    status, components = readyz(settings)
    assert status == 503
    storage = components["storage"]
    assert storage["ok"] is False and "below the floor" in storage["error"]
    assert str(tmp_path) not in storage["error"]
    assert components["database"]["ok"] is True


def test_not_ready_when_the_store_cannot_take_a_write(tmp_path: Path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    # Where uploads are staged is taken by a file: every upload would fail there, whatever
    # the directory's permission bits say (and root ignores those anyway).
    (artifacts / ".staging").write_text("")
    settings = Settings(data_dir=tmp_path / "var", artifacts_url=artifacts.as_uri())
    status, components = readyz(settings)
    assert status == 503
    assert "not writable" in components["storage"]["error"], components
    assert str(tmp_path) not in components["storage"]["error"]
