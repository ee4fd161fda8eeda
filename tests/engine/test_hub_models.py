"""``hf://org/name[@revision]`` through a Hugging Face cache prepared here, offline: a moving
revision resolves to the commit the cache holds and that commit is in report.json; unknown
repos and revisions and gated repos are clear errors with their own codes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from shortened.engine.errors import ModelGated, ModelNotFound
from shortened.engine.models import resolve_source
from shortened.engine.prune import prune_model
from shortened.specs import PruneSpec
from tests.helpers import save_tiny, tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$HF_HOME/hub with org/tiny at COMMIT (refs/main points to it), offline."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--org--tiny"
    save_tiny(tiny_model("llama", num_layers=4), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_a_moving_revision_resolves_to_the_cached_commit(hub_cache: Path, tmp_path: Path):
    for source in ("hf://org/tiny", "hf://org/tiny@main", f"hf://org/tiny@{COMMIT}"):
        resolved = resolve_source(source)
        assert resolved.commit == COMMIT and resolved.hub_id == "org/tiny"
        assert Path(resolved.path_or_id).name == COMMIT
    spec = PruneSpec(model="hf://org/tiny", criterion="magnitude", num_blocks=1, protect_first=1)
    report = prune_model(spec, tmp_path / "out")
    assert report["model"] == "hf://org/tiny" and report["model_commit"] == COMMIT


def test_unknown_repos_and_revisions_are_model_not_found(hub_cache: Path):
    with pytest.raises(ModelNotFound, match="not in the Hugging Face cache") as caught:
        resolve_source("hf://org/absent")
    assert caught.value.code == "model_not_found"
    with pytest.raises(ModelNotFound, match="org/tiny@v9"):
        resolve_source("hf://org/tiny@v9")


def test_a_gated_repo_is_model_gated(hub_cache: Path, monkeypatch: pytest.MonkeyPatch):
    # What the Hub answers for a gated repo the token may not read (a 403 with this code).
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*_args, **_kwargs):
        request = httpx.Request("GET", "https://huggingface.co/api/models/meta-llama/x")
        response = httpx.Response(403, request=request, headers={"X-Error-Code": "GatedRepo"})
        raise GatedRepoError("Access to model meta-llama/x is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(ModelGated, match="gated model.*HF_TOKEN") as caught:
        resolve_source("hf://meta-llama/x")
    assert caught.value.code == "model_gated"


def test_a_gguf_file_in_a_hub_repository_is_a_model_source(hub_cache: Path, tmp_path: Path):
    """``hf://org/name/file.gguf[@revision]``: the one file, through the same cache (offline
    here), dequantized into a checkpoint; a file the repository lacks is model_not_found."""
    from shortened.engine.export.converter import convert

    repo = hub_cache / "hub" / "models--org--tiny-gguf"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    convert(Path(resolve_source("hf://org/tiny").path_or_id), snapshot / "tiny.F16.gguf", "f16")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for source in (
        "hf://org/tiny-gguf/tiny.F16.gguf",
        f"hf://org/tiny-gguf/tiny.F16.gguf@{COMMIT}",
    ):
        resolved = resolve_source(source, cache_dir=tmp_path / "cache")
        assert resolved.gguf_file is not None and resolved.gguf_file.endswith("tiny.F16.gguf")
        assert (Path(resolved.path_or_id) / "gguf_source.json").is_file()
    with pytest.raises(ModelNotFound, match="other.gguf"):
        resolve_source("hf://org/tiny-gguf/other.gguf", cache_dir=tmp_path / "cache")
