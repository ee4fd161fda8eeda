"""Admission of ``expert_pruning`` from the model's config.json: what the engine would refuse
after loading and scoring (a dense model, grouped routing, a count that removes nothing or
keeps fewer than a token's top-k) is refused before the job is queued, on the field it
belongs to, through the job-kind table, the HTTP API (422) and the CLI (one ``error:`` line,
torch not imported); the CLI's expert options fill the spec and the dry run shows the
experts kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shortened.cli import build_parser
from shortened.cli.prune_command import prune_spec
from shortened.engine.families import FAMILIES, grouped_routing_families
from shortened.kinds import problems
from shortened.specs import PruneSpec
from tests.helpers import CALIBRATION, REPO, TINY_MODEL, tiny_model

MOE_FAMILIES = sorted(t for f in FAMILIES if f.moe is not None for t in f.model_types)
GROUPED = ["deepseek_v2", "deepseek_v3", "glm4_moe"]


def checkpoint(tmp_path: Path, model_type: str, **overrides) -> Path:
    """A tiny model's config.json (all admission reads) in a directory of its own."""
    path = tmp_path / model_type
    tiny_model(model_type, **overrides).config.save_pretrained(path)
    return path


def prune(model: Path | str, section: dict | None, **overrides) -> PruneSpec:
    return PruneSpec.model_validate(
        {
            "model": str(model),
            "num_blocks": 1,
            "protect_first": 1,
            "protect_last": 1,
            "calibration": {"source": str(CALIBRATION)},
            "expert_pruning": section,
            **overrides,
        }
    )


def refused(model: Path | str, section: dict | None) -> dict[str, str]:
    return {p.field: p.message for p in problems("prune", prune(model, section))}


def test_a_dense_model_is_refused(tmp_path) -> None:
    found = refused(TINY_MODEL, {"keep_experts": 2})
    assert list(found) == ["expert_pruning"]
    assert "needs a mixture-of-experts model" in found["expert_pruning"]
    assert "Llama" in found["expert_pruning"] and "dense" in found["expert_pruning"]


def test_an_moe_family_config_without_moe_blocks_is_refused(tmp_path) -> None:
    all_dense = checkpoint(tmp_path, "qwen3_moe", mlp_only_layers=list(range(6)))
    found = refused(all_dense, {"keep_experts": 2})
    assert list(found) == ["expert_pruning"] and "has none" in found["expert_pruning"]


@pytest.mark.parametrize("model_type", GROUPED)
def test_grouped_routing_families_are_refused(tmp_path, model_type: str) -> None:
    found = refused(checkpoint(tmp_path, model_type), {"keep_experts": 3})
    assert list(found) == ["expert_pruning"]
    assert "fixed groups" in found["expert_pruning"]


def test_the_grouped_routing_list_is_the_family_table() -> None:
    assert grouped_routing_families() == ("DeepSeek-V2 / V3", "GLM-4.5 (MoE)")
    grouped_types = {
        t for f in FAMILIES if f.moe is not None and f.moe.grouped_routing for t in f.model_types
    }
    assert grouped_types == set(GROUPED)


@pytest.mark.parametrize(
    ("section", "field", "message"),
    [
        ({"keep_experts": 4}, "expert_pruning.keep_experts", "keeping 4 of the 4 experts"),
        ({"keep_experts": 9}, "expert_pruning.keep_experts", "removes none"),
        ({"keep_experts": 1}, "expert_pruning.keep_experts", "num_experts_per_tok (2)"),
        ({"keep_fraction": 0.8}, "expert_pruning.keep_fraction", "0.8 of 4 experts rounds up to 4"),
        ({"keep_fraction": 0.2}, "expert_pruning.keep_fraction", "keep at least 2"),
    ],
)
def test_a_count_that_removes_nothing_or_is_below_top_k_is_refused(
    tmp_path, section: dict, field: str, message: str
) -> None:
    found = refused(checkpoint(tmp_path, "mixtral"), section)  # 4 experts, 2 per token
    assert list(found) == [field] and message in found[field], found


@pytest.mark.parametrize("model_type", sorted(set(MOE_FAMILIES) - set(GROUPED)))
def test_every_supported_moe_family_is_admitted(tmp_path, model_type: str) -> None:
    model = checkpoint(tmp_path, model_type)
    assert refused(model, {"keep_experts": 3}) == {}
    assert refused(model, {"keep_fraction": 0.5}) == {}  # 2 of 4: top-2 still fits


def test_without_a_section_or_a_readable_config_nothing_is_checked(tmp_path) -> None:
    assert refused(TINY_MODEL, None) == {}
    assert refused("hf://some/moe-model", {"keep_experts": 1}) == {}


def test_the_api_refuses_with_a_422_naming_the_field(tmp_path) -> None:
    from service.db import upgrade_database
    from service.main import create_app
    from shortened.config import Settings

    (tmp_path / "var").mkdir()
    url = f"sqlite:///{tmp_path / 'var' / 'shortened.db'}"
    upgrade_database(url)
    settings = Settings(
        data_dir=tmp_path / "var", database_url=url, allowed_local_roots=[tmp_path, REPO]
    )
    model = checkpoint(tmp_path, "mixtral")
    body = prune(model, {"keep_experts": 1}).model_dump(mode="json", exclude_none=True)
    with TestClient(create_app(settings)) as client:
        response = client.post("/jobs/prune", json=body)
        assert response.status_code == 422, response.text
        found = {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}
        assert "num_experts_per_tok (2)" in found[("body", "expert_pruning", "keep_experts")]
        # The dry run admits the same way, and its plan counts the experts removed.
        body["expert_pruning"] = {"keep_experts": 3}
        planned = client.post("/jobs/prune?dry_run=true", json=body)
        assert planned.status_code == 200, planned.text
        plan = planned.json()["plan"]
        assert (plan["experts_before"], plan["experts_after"]) == (4, 3)


def parse(*argv: str) -> PruneSpec:
    base = ["prune", "--model", str(TINY_MODEL), "--num-blocks", "1"]
    return prune_spec(build_parser().parse_args([*base, "--calibration", str(CALIBRATION), *argv]))


def test_the_cli_options_fill_the_expert_pruning_section(capsys) -> None:
    assert parse().expert_pruning is None
    section = parse("--keep-experts", "3").expert_pruning
    assert section is not None and (section.keep_experts, section.keep_fraction) == (3, None)
    section = parse("--keep-expert-fraction", "0.5").expert_pruning
    assert section is not None and (section.keep_experts, section.keep_fraction) == (None, 0.5)
    with pytest.raises(SystemExit):
        parse("--keep-experts", "3", "--keep-expert-fraction", "0.5")
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--help"])
    help_text = capsys.readouterr().out
    assert "--keep-experts N" in help_text and "--keep-expert-fraction F" in help_text


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        "from shortened.cli import main\n"
        f"rc = main({list(argv)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_the_cli_refuses_in_one_line_and_its_dry_run_counts_the_experts(tmp_path) -> None:
    model = str(checkpoint(tmp_path, "mixtral"))
    base = ["prune", "--model", model, "--num-blocks", "1", "--calibration", str(CALIBRATION)]
    base += ["--protect-first", "1", "--protect-last", "1"]
    result = run_cli(*base, "--keep-experts", "4", "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "shortened prune: error: expert_pruning.keep_experts: keeping 4 of the 4 experts of "
        "each block removes none: keep fewer"
    ]
    assert not (tmp_path / "out").exists()

    result = run_cli(*base, "--keep-expert-fraction", "0.75", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "expert pruning: 4 -> 3 routed experts per MoE block" in result.stdout
    config = json.loads((Path(model) / "config.json").read_text())
    from shortened.kinds import plan_job

    plan = plan_job("prune", prune(model, {"keep_fraction": 0.75}), config)
    assert plan is not None
    assert f"params: {plan.params_before:,} -> {plan.params_after:,}" in result.stdout
    assert f"-> {plan.active_params_after:,}" in result.stdout
