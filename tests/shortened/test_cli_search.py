"""``shortened search``: the engine run locally, the ranking printed, bad budgets refused
with the field named before any model is loaded."""

from __future__ import annotations

import json

import pytest

from shortened.cli import build_parser, main
from shortened.cli.search_command import search_spec
from shortened.specs import ONE_SHOT_CRITERIA, SearchSpec
from tests.helpers import CALIBRATION, TINY_MODEL

BASE = ["search", "--model", str(TINY_MODEL), "--calibration", str(CALIBRATION)]
SMALL = ["--n-samples", "4", "--seq-len", "64", "--validation-windows", "2", "--device", "cpu"]


def test_search_prints_the_ranking_and_saves_the_best(tmp_path, capsys, one_torch_thread):
    out = tmp_path / "out"
    argv = [*BASE, *SMALL, "--criteria", "magnitude,block_influence", "--ratio", "0.25"]
    assert main([*argv, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    ranking = report["search"]["ranking"]
    assert "| rank | criteria | num_blocks | removed_blocks |" in printed
    assert printed.count("\n| ") == len(ranking) + 1  # header and one row per candidate
    best = report["search"]["best"]
    assert f"removing blocks {best['removed_blocks']}" in printed
    assert report["search"]["criteria"] == ["magnitude", "block_influence"]
    assert report["search"]["budget"] == {"target_ratio": 0.25}
    assert f"saved to {out}" in printed


def test_options_default_to_the_spec():
    args = build_parser().parse_args([*BASE, "--min-speedup", "1.2", "--output", "x"])
    spec = search_spec(args)
    assert spec.criteria == list(ONE_SHOT_CRITERIA)
    assert spec.validation == SearchSpec.model_fields["validation"].get_default(
        call_default_factory=True
    )
    assert spec.min_speedup == 1.2 and spec.num_blocks is None
    ranged = search_spec(build_parser().parse_args([*BASE, "--num-blocks", "2-4", "--output", "x"]))
    assert ranged.num_blocks is not None and (ranged.num_blocks.min, ranged.num_blocks.max) == (
        2,
        4,
    )


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--num-blocks", "4-2"], "num_blocks"),
        (["--min-speedup", "2.5"], "min_speedup"),  # 6 removable of 12: at most 2x
        (["--num-blocks", "7-8"], "num_blocks.min"),
        (["--ratio", "0.2", "--validation-fraction", "1.5"], "validation.fraction"),
    ],
)
def test_bad_budgets_are_refused_naming_the_field(extra, words, tmp_path, capsys):
    assert main([*BASE, *extra, "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("shortened search: error:") and words in error, error
    assert not (tmp_path / "out").exists()


def test_unknown_criteria_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*BASE, "--criteria", "ppl,psychic", "--ratio", "0.2"])
    assert exit_.value.code == 2
    assert "unknown criteria ['psychic']" in capsys.readouterr().err
