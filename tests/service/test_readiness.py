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


def test_not_ready_until_the_database_is_migrated_to_this_versions_head(tmp_path: Path):
    """With PostgreSQL, migrating is a deploy step: an API whose database is behind says so
    (admission needs the latest migration); once migrated it is ready."""
    from service.db import migration_revisions
    from tests.e2e_service import postgres_database

    head, _ = migration_revisions()
    with postgres_database() as url:
        upgrade_database(url, "0005")
        settings = Settings(data_dir=tmp_path / "var", database_url=url)
        with TestClient(create_app(settings)) as client:
            response = client.get("/readyz")
            assert response.status_code == 503
            error = response.json()["components"]["database"]["error"]
            assert "revision 0005" in error and head in error and "upgrade head" in error
            upgrade_database(url)
            assert client.get("/readyz").status_code == 200
            client.app.state.engine.dispose()
