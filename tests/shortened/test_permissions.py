"""Outputs, stored artifacts and downloads get the user's umask (0644 / 0755 by default), not
the 0600 / 0700 of the temporary names they are written under."""

from __future__ import annotations

import os
import stat

import pytest

from shortened.engine.outputs import atomic_output_dir
from shortened.storage import LocalStore, download_published, publish_directory


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_modes_follow_the_umask(tmp_path, umask) -> None:
    out = tmp_path / "pruned"
    with atomic_output_dir(out) as staging:
        (staging / "config.json").write_text("{}")
    assert mode(out) == 0o777 & ~umask
    assert mode(out / "config.json") == 0o666 & ~umask

    store = LocalStore(tmp_path / "store")
    publish_directory(store, out, "jobs/j1")
    stored = [p for p in (tmp_path / "store" / "jobs" / "j1").rglob("*") if p.is_file()]
    assert stored and {mode(p) for p in stored} == {0o666 & ~umask}

    dest = tmp_path / "download"
    download_published(store, "jobs/j1", dest)
    assert mode(dest) == 0o777 & ~umask
    assert {mode(p) for p in dest.iterdir()} == {0o666 & ~umask}
