"""prune_model and the CLI on tiny random checkpoints: report, target ratio, atomic output, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from shortened.engine.errors import (
    CalibrationError,
    Cancelled,
    ModelNotFound,
    NothingToPrune,
    OutputExists,
    UnsupportedArchitecture,
)
from shortened.engine.prune import blocks_for_ratio, prune_model
from shortened.specs import CalibrationSpec, PruneSpec
from tests.helpers import save_tiny, tiny_model

REPORT_KEYS = {
    "criterion",
    "block_scores",
    "removal_order",
    "removed_blocks",
    "kept_blocks",
    "num_layers_before",
    "num_layers_after",
    "params_before",
    "params_after",
    "calibration",
    "versions",
    "timings",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    save_tiny(tiny_model("llama", num_layers=8), root / "model")
    with (root / "cal.jsonl").open("w") as handle:
        for i in range(40):
            handle.write(
                json.dumps(
                    {
                        "text": " ".join(
                            ["the quick brown fox jumps over a lazy dog"] * (3 + i % 4)
                        )
                        + f" {i}"
                    }
                )
                + "\n"
            )
    return root


def spec_for(workspace: Path, **overrides) -> PruneSpec:
    calibration = CalibrationSpec(source=str(workspace / "cal.jsonl"), n_samples=6, seq_len=16)
    return PruneSpec(
        **{
            "model": str(workspace / "model"),
            "num_blocks": 2,
            "calibration": calibration,
            **overrides,
        }
    )


def test_prune_writes_checkpoint_and_report(workspace, tmp_path):
    out = tmp_path / "out"
    stages = []
    report = prune_model(spec_for(workspace), out, progress=lambda p: stages.append(p.stage))
    assert REPORT_KEYS <= report.keys()
    assert report["num_layers_before"] == 8 and report["num_layers_after"] == 6
    assert len(report["removed_blocks"]) == 2 and set(report["removed_blocks"]) <= {4, 5}
    assert report["kept_blocks"] == [b for b in range(8) if b not in report["removed_blocks"]]
    assert report["params_after"] < report["params_before"]
    assert len(report["calibration"]["fingerprint"]) == 16 and report["calibration"]["windows"] == [
        6,
        16,
    ]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == [
        "loading",
        "calibration",
        "scoring",
        "quality_gate",  # the unpruned model on held-out windows, before any block goes
        "pruning",
        "saving",
    ]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["removed_blocks"] == report["removed_blocks"]
    rows = list(csv.DictReader((out / "block_scores.csv").open()))
    assert len(rows) == 8 and sum(int(r["removed"]) for r in rows) == 2
    assert (out / "block_scores.svg").read_text().count('class="bar removed"') == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    assert not list(tmp_path.glob(".out.partial-*"))


def test_same_seed_same_calibration_fingerprint(workspace, tmp_path):
    a = prune_model(spec_for(workspace, criterion="magnitude"), tmp_path / "a")
    b = prune_model(spec_for(workspace, criterion="magnitude"), tmp_path / "b")
    calibration = CalibrationSpec(
        source=str(workspace / "cal.jsonl"), n_samples=6, seq_len=16, seed=7
    )
    c = prune_model(
        spec_for(workspace, criterion="magnitude", calibration=calibration), tmp_path / "c"
    )
    assert (
        a["calibration"]["fingerprint"]
        == b["calibration"]["fingerprint"]
        != c["calibration"]["fingerprint"]
    )


def test_target_ratio_picks_closest_block_count(workspace, tmp_path):
    report = prune_model(
        spec_for(
            workspace,
            num_blocks=None,
            target_ratio=0.2,
            criterion="magnitude",
            protect_first=1,
            protect_last=1,
        ),
        tmp_path / "r",
    )
    per_block = (report["params_before"] - report["params_after"]) / report["num_blocks_removed"]
    achieved = report["params_removed_ratio"]
    for k in range(1, 7):
        assert abs(achieved - 0.2) <= abs(k * per_block / report["params_before"] - 0.2) + 1e-6
    assert blocks_for_ratio(1000, [100] * 8, 0.26, 8) == 3
    assert blocks_for_ratio(1000, [100] * 8, 0.9, 4) == 4


def test_no_protection_can_remove_any_block(workspace, tmp_path):
    report = prune_model(
        spec_for(workspace, protect_first=0, protect_last=0, num_blocks=7, criterion="magnitude"),
        tmp_path / "n",
    )
    assert report["num_layers_after"] == 1 and report["protected_blocks"] == []


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"num_blocks": 3}, NothingToPrune, "only 2 are removable"),
        ({"model": "/nonexistent/model"}, ModelNotFound, "does not exist"),
        (
            {"calibration": CalibrationSpec(source="/nonexistent.jsonl")},
            CalibrationError,
            "does not exist",
        ),
        (
            {"calibration": CalibrationSpec(source="CAL", seq_len=4096, n_samples=2)},
            CalibrationError,
            "longest has",
        ),
        (
            {"calibration": CalibrationSpec(source="CAL", n_samples=41, seq_len=8)},
            CalibrationError,
            "need 41 documents",
        ),
    ],
)
def test_bad_input_fails_cleanly(workspace, tmp_path, overrides, error, match):
    if "calibration" in overrides and overrides["calibration"].source == "CAL":
        overrides["calibration"] = overrides["calibration"].model_copy(
            update={"source": str(workspace / "cal.jsonl")}
        )
    with pytest.raises(error, match=match):
        prune_model(spec_for(workspace, **overrides), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_empty_calibration_file(workspace, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    calibration = CalibrationSpec(source=str(tmp_path / "empty.txt"))
    with pytest.raises(CalibrationError, match="no text"):
        prune_model(spec_for(workspace, calibration=calibration), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path, workspace):
    from transformers import AutoConfig

    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitecture, match="supported families: Llama"):
        prune_model(spec_for(workspace, model=str(tmp_path / "gpt2")), tmp_path / "out")


def test_existing_output_is_refused_and_kept(workspace, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExists):
        prune_model(spec_for(workspace), out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_cancel_leaves_nothing(workspace, tmp_path):
    def cancel_when_scoring(update):
        if update.stage == "scoring" and update.done >= 2:
            raise Cancelled("cancelled by test")

    with pytest.raises(Cancelled):
        prune_model(spec_for(workspace), tmp_path / "out", progress=cancel_when_scoring)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_saving_leaves_no_output(workspace, tmp_path, monkeypatch):
    from shortened.engine import prune as prune_module

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prune_module, "write_scores_csv", explode)
    with pytest.raises(OSError, match="disk full"):
        prune_model(spec_for(workspace), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shortened.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_prune_success_and_errors(workspace, tmp_path):
    base = [
        "prune",
        "--model",
        str(workspace / "model"),
        "--calibration",
        str(workspace / "cal.jsonl"),
        "--seq-len",
        "16",
        "--n-samples",
        "4",
    ]
    ok = run_cli(*base, "--num-blocks", "2", "--output", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert "removed blocks" in ok.stdout and "[scoring]" in ok.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()

    cases = [
        (["--num-blocks", "2", "--output", str(tmp_path / "out")], "exists and is not empty"),
        (["--num-blocks", "5", "--output", str(tmp_path / "o2")], "so at most 2 can go"),
        (["--num-blocks", "0", "--output", str(tmp_path / "o2")], "num_blocks"),
        (["--ratio", "1.5", "--output", str(tmp_path / "o2")], "target_ratio"),
        (["--num-blocks", "1", "--seq-len", "5000", "--output", str(tmp_path / "o2")], "tokens"),
    ]
    for extra, message in cases:
        result = run_cli(*base, *extra)
        assert result.returncode == 2, (extra, result.stderr)
        error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    missing = run_cli(
        "prune",
        "--model",
        str(tmp_path / "nope"),
        "--num-blocks",
        "1",
        "--calibration",
        str(workspace / "cal.jsonl"),
        "--output",
        str(tmp_path / "o3"),
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
