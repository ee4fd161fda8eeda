"""Hostile or absurd ``config.json`` files in an allowed root, as a class: every form is
refused by the one validator (``shortened.model_configs``) on every path that reads a
config — a submission, a dry run, a pipeline section's ``compare_with``, the CLI before torch
and the engine's loader — with the field it names, never a 500, a nonsense plan or a job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.stores.job_admission import count_active_jobs
from shortened.config import Settings
from shortened.engine.errors import InvalidModelConfig
from tests.e2e_service import TINY_MODEL

REPO = TINY_MODEL.parents[1]
GOOD = json.loads((TINY_MODEL / "config.json").read_text())


def _with(**fields) -> str:
    return json.dumps({**GOOD, **fields})


# name: (config.json text, what the refusal names)
HOSTILE: dict[str, tuple[str, str]] = {
    "huge layer count": (_with(num_hidden_layers=10**9), "num_hidden_layers"),
    "layer count past the bound": (_with(num_hidden_layers=1025), "num_hidden_layers"),
    "zero width": (_with(hidden_size=0), "hidden_size"),
    "negative width": (_with(intermediate_size=-4096), "intermediate_size"),
    "fractional heads": (_with(num_attention_heads=4.5), "num_attention_heads"),
    "string vocabulary": (_with(vocab_size="32000"), "vocab_size"),
    "boolean layers": (_with(num_hidden_layers=True), "num_hidden_layers"),
    "astronomical vocabulary": (_with(vocab_size=10**30), "vocab_size"),
    "64-bit overflow": (_with(hidden_size=2**64), "hidden_size"),
    "infinity literal": (_with(hostile_eps=1).replace('"hostile_eps": 1', '"hostile_eps": Infinity'), "non-finite"),
    "NaN literal": (_with(hostile_theta=1).replace('"hostile_theta": 1', '"hostile_theta": NaN'), "non-finite"),
    "overflowing float": (_with(hostile_theta=1).replace('"hostile_theta": 1', '"hostile_theta": 1e999'), "non-finite"),
    "missing width": (json.dumps({k: v for k, v in GOOD.items() if k != "hidden_size"}), "hidden_size"),
    "more kv heads than heads": (_with(num_key_value_heads=64), "num_key_value_heads"),
    "width not a multiple of heads": (_with(hidden_size=129, head_dim=None), "multiple"),
    "deep nesting": (json.dumps({**GOOD, "x": 0})[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
    "moderate nesting": (json.dumps({**GOOD, "deep": json.loads("[" * 40 + "]" * 40)}), "nested"),
    "huge file": (json.dumps({**GOOD, "pad": "x" * (2 << 20)}), "bytes"),
    "not an object": ("[1, 2, 3]", "not a JSON object"),
    "not JSON": ("{num_hidden_layers: 12", "not readable JSON"),
}  # fmt: skip


def hostile_model(root: Path, text: str) -> Path:
    model = root / "hostile"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(TINY_MODEL, model)
    (model / "config.json").write_text(text)
    return model


@pytest.fixture
def client(database_url: str, tmp_path: Path):
    settings = Settings(
        data_dir=tmp_path / "var", database_url=database_url, allowed_local_roots=[tmp_path, REPO]
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_config_is_refused_with_its_field_on_every_path(
    client: TestClient, tmp_path: Path, case: str
) -> None:
    text, named = HOSTILE[case]
    model = str(hostile_model(tmp_path, text))
    prune = {"model": model, "num_blocks": 2, "criterion": "magnitude"}
    evaluation = {
        "model": str(TINY_MODEL),
        "compare_with": model,
        "perplexity": {"datasets": ["wikitext2"]},
    }
    for path, body, field in (
        ("/jobs/prune", prune, "model"),
        ("/jobs/prune?dry_run=true", prune, "model"),
        ("/jobs/eval", evaluation, "compare_with"),
        ("/jobs/eval?dry_run=true", evaluation, "compare_with"),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 422, (case, path, response.text)
        errors = {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}
        assert ("body", field) in errors, (case, path, errors)
        assert named in errors[("body", field)], (case, path, errors)
    with client.app.state.sessionmaker() as session:
        assert count_active_jobs(session, "default") == 0


@pytest.mark.parametrize("case", ["huge layer count", "infinity literal", "deep nesting"])
def test_the_cli_and_the_engine_refuse_it_too(tmp_path: Path, case: str) -> None:
    text, named = HOSTILE[case]
    model = hostile_model(tmp_path, text)
    cli = subprocess.run(
        [sys.executable, "-m", "shortened.cli", "prune", "--model", str(model),
         "--criterion", "magnitude", "--num-blocks", "2", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 2, cli.stderr
    [line] = cli.stderr.strip().splitlines()
    assert "error:" in line and named in line
    assert not (tmp_path / "out").exists()

    from shortened.engine.models import load_model

    with pytest.raises(InvalidModelConfig, match=named):
        load_model(str(model), device="cpu")
