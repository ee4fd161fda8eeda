"""The engine commands take their defaults, choices and help from the spec models: a command
run with only the required options builds the spec the model's defaults make, and every
option names the spec's default and choices, so a changed spec default cannot drift."""

from __future__ import annotations

import argparse
from typing import get_args

import pytest

from shortened.cli import build_parser
from shortened.cli.eval_command import eval_spec
from shortened.cli.export_command import export_spec
from shortened.cli.prune_command import prune_spec
from shortened.cli.retrain_command import retrain_spec
from shortened.specs import (
    CRITERIA,
    RETRAIN_METHODS,
    CalibrationSpec,
    CptSpec,
    DataFormat,
    Dtype,
    EfficiencySpec,
    EvalSpec,
    LoraSpec,
    PerplexitySpec,
    PruneSpec,
    QualityGateSpec,
    RetrainSpec,
    TrainDataSpec,
    ZeroShotSpec,
)

# (command, option, spec model, field): each option and the spec field it fills.
SPEC_OPTIONS = [
    ("prune", "--criterion", PruneSpec, "criterion"),
    ("prune", "--calibration-split", CalibrationSpec, "split"),
    ("prune", "--calibration-field", CalibrationSpec, "field"),
    ("prune", "--n-samples", CalibrationSpec, "n_samples"),
    ("prune", "--seq-len", CalibrationSpec, "seq_len"),
    ("prune", "--seed", CalibrationSpec, "seed"),
    ("prune", "--protect-first", PruneSpec, "protect_first"),
    ("prune", "--protect-last", PruneSpec, "protect_last"),
    ("prune", "--batch-size", PruneSpec, "batch_size"),
    ("prune", "--device", PruneSpec, "device"),
    ("prune", "--dtype", PruneSpec, "dtype"),
    ("prune", "--max-ppl-ratio", QualityGateSpec, "max_ppl_ratio"),
    ("prune", "--gate-windows", QualityGateSpec, "windows"),
    ("retrain", "--max-ppl-ratio", QualityGateSpec, "max_ppl_ratio"),
    ("retrain", "--method", RetrainSpec, "method"),
    ("retrain", "--data-split", TrainDataSpec, "split"),
    ("retrain", "--format", TrainDataSpec, "format"),
    ("retrain", "--field", TrainDataSpec, "field"),
    ("retrain", "--validation-fraction", TrainDataSpec, "validation_fraction"),
    ("retrain", "--lora-r", LoraSpec, "r"),
    ("retrain", "--lora-alpha", LoraSpec, "alpha"),
    ("retrain", "--lora-dropout", LoraSpec, "dropout"),
    ("retrain", "--cpt-lr", CptSpec, "learning_rate"),
    ("retrain", "--cpt-warmup-steps", CptSpec, "warmup_steps"),
    ("retrain", "--lr", RetrainSpec, "learning_rate"),
    ("retrain", "--epochs", RetrainSpec, "epochs"),
    ("retrain", "--micro-batch-size", RetrainSpec, "micro_batch_size"),
    ("retrain", "--batch-size", RetrainSpec, "batch_size"),
    ("retrain", "--cutoff-len", RetrainSpec, "cutoff_len"),
    ("retrain", "--warmup-steps", RetrainSpec, "warmup_steps"),
    ("retrain", "--save-steps", RetrainSpec, "save_steps"),
    ("retrain", "--logging-steps", RetrainSpec, "logging_steps"),
    ("retrain", "--seed", RetrainSpec, "seed"),
    ("retrain", "--device", RetrainSpec, "device"),
    ("retrain", "--dtype", RetrainSpec, "dtype"),
    ("eval", "--seq-len", PerplexitySpec, "seq_len"),
    ("eval", "--ppl-field", PerplexitySpec, "field"),
    ("eval", "--ppl-batch-size", PerplexitySpec, "batch_size"),
    ("eval", "--num-fewshot", ZeroShotSpec, "num_fewshot"),
    ("eval", "--eval-batch-size", ZeroShotSpec, "batch_size"),
    ("eval", "--repeats", EfficiencySpec, "repeats"),
    ("eval", "--warmup", EfficiencySpec, "warmup"),
    ("eval", "--device", EvalSpec, "device"),
    ("eval", "--dtype", EvalSpec, "dtype"),
]

# Options that exist only on the command line (flags that switch something off or on).
CLI_ONLY_FLAGS = {
    "help", "no_protect", "no_merge", "no_resume", "efficiency", "greedy", "dry_run",
    "no_quality_gate", "agreement_plain",
}  # fmt: skip

CHOICES = {
    ("prune", "--criterion"): CRITERIA,
    ("prune", "--dtype"): get_args(Dtype),
    ("retrain", "--method"): RETRAIN_METHODS,
    ("retrain", "--format"): get_args(DataFormat),
    ("retrain", "--dtype"): get_args(Dtype),
    ("eval", "--dtype"): get_args(Dtype),
}


def _command(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _option(command: str, flag: str) -> argparse.Action:
    return next(a for a in _command(command)._actions if flag in a.option_strings)


def test_required_options_alone_give_the_spec_defaults() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["prune", "--model", "m", "--num-blocks", "2", "--calibration", "c.txt", "--output", "o"]
    )
    assert prune_spec(args) == PruneSpec(
        model="m", num_blocks=2, calibration=CalibrationSpec(source="c.txt")
    )
    args = parser.parse_args(["retrain", "--model", "m", "--data", "d.jsonl", "--output", "o"])
    assert retrain_spec(args) == RetrainSpec(model="m", data=TrainDataSpec(source="d.jsonl"))
    args = parser.parse_args(["eval", "--model", "m", "--ppl", "t.txt"])
    assert eval_spec(args) == EvalSpec(model="m", perplexity=PerplexitySpec(datasets=["t.txt"]))


def test_given_options_reach_the_spec() -> None:
    args = build_parser().parse_args(
        [
            "prune",
            "--model",
            "m",
            "--ratio",
            "0.2",
            "--calibration-dataset",
            "bookcorpus",
            "--n-samples",
            "3",
            "--criterion",
            "taylor",
            "--no-protect",
            "--add-bos-to-every",
            "--output",
            "o",
        ]
    )
    spec = prune_spec(args)
    assert (spec.target_ratio, spec.criterion, spec.protect_first, spec.protect_last) == (
        0.2,
        "taylor",
        0,
        0,
    )
    assert spec.calibration.dataset == "bookcorpus" and spec.calibration.n_samples == 3
    assert spec.calibration.add_bos_to_every is True


@pytest.mark.parametrize(("command", "flag", "model", "field"), SPEC_OPTIONS)
def test_each_option_shows_the_spec_default(command, flag, model, field) -> None:
    action = _option(command, flag)
    assert action.default is None  # the spec applies its default
    default = model.model_fields[field].default
    assert f"(default: {default})" in action.help or action.help == f"default: {default}"
    help_text = " ".join(_command(command).format_help().split())
    assert f"default: {default}" in help_text


@pytest.mark.parametrize(("command", "flag"), sorted(CHOICES))
def test_choices_are_the_spec_literals(command, flag) -> None:
    assert tuple(_option(command, flag).choices) == tuple(CHOICES[command, flag])


@pytest.mark.parametrize("command", ["prune", "retrain", "eval"])
def test_no_option_sets_a_default_of_its_own(command) -> None:
    own = [
        a.dest
        for a in _command(command)._actions
        if a.default is not None and a.dest not in CLI_ONLY_FLAGS
    ]
    assert own == []


def test_quality_gate_options_reach_the_spec_and_no_gate_turns_it_off() -> None:
    base = ["prune", "--model", "m", "--num-blocks", "2", "--calibration", "c.txt", "--output", "o"]
    spec = prune_spec(
        build_parser().parse_args([*base, "--max-ppl-ratio", "5", "--gate-windows", "3"])
    )
    assert (spec.quality_gate.max_ppl_ratio, spec.quality_gate.windows) == (5.0, 3)
    spec = prune_spec(build_parser().parse_args([*base, "--no-quality-gate"]))
    assert spec.quality_gate.max_ppl_ratio is None and spec.quality_gate.windows == 8
    assert _retrain("--no-quality-gate").quality_gate.max_ppl_ratio is None
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args([*base, "--no-quality-gate", "--max-ppl-ratio", "5"])


def test_bad_choice_is_refused_naming_the_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["prune", "--model", "m", "--num-blocks", "1", "--criterion", "nope", "--output", "o"]
        )
    assert "invalid choice: 'nope'" in capsys.readouterr().err


RETRAIN = ["retrain", "--model", "m", "--data", "d.jsonl", "--output", "o"]


def _retrain(*extra: str) -> RetrainSpec:
    return retrain_spec(build_parser().parse_args([*RETRAIN, *extra]))


def test_max_steps_is_the_budget_of_every_method() -> None:
    kd = _retrain("--method", "kd", "--teacher", "parent", "--max-steps", "40")
    assert kd.kd is not None and kd.kd.max_steps == 40 and kd.cpt is None
    cpt = _retrain("--method", "cpt", "--max-steps", "30")
    assert cpt.cpt is not None and cpt.cpt.max_steps == 30 and cpt.kd is None
    both = _retrain("--method", "cpt_lora", "--max-steps", "20")
    assert both.cpt is not None and both.cpt.max_steps == 20 and both.max_steps == 20
    lora = _retrain("--method", "lora", "--max-steps", "10")
    assert lora.max_steps == 10 and lora.cpt is None and lora.kd is None


def test_a_stage_flag_wins_over_the_shared_one() -> None:
    spec = _retrain("--method", "kd", "--teacher", "p", "--max-steps", "40", "--kd-max-steps", "7")
    assert spec.kd is not None and spec.kd.max_steps == 7 and spec.max_steps == 40
    spec = _retrain(
        "--method", "cpt", "--lr", "3e-4", "--cpt-lr", "1e-5", "--warmup-steps", "5",
        "--max-steps", "4",
    )  # fmt: skip
    assert spec.cpt is not None and spec.learning_rate == 3e-4
    assert (spec.cpt.learning_rate, spec.cpt.warmup_steps, spec.cpt.max_steps) == (1e-5, 5, 4)
    spec = _retrain("--method", "kd", "--teacher", "p", "--lr", "3e-4", "--max-steps", "9")
    assert spec.kd is not None and spec.kd.learning_rate == 3e-4


def test_a_token_budget_makes_max_steps_a_cap() -> None:
    spec = _retrain("--method", "cpt", "--max-tokens", "100000", "--max-steps", "5")
    assert spec.cpt is not None and (spec.cpt.max_tokens, spec.cpt.max_steps) == (100000, None)
    assert spec.max_steps == 5
    spec = _retrain("--method", "kd", "--teacher", "p", "--kd-max-steps", "3", "--max-tokens", "9")
    assert spec.kd is not None and (spec.kd.max_steps, spec.kd.max_tokens) == (3, None)


def test_a_stage_without_a_budget_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly one of 'max_steps' and 'max_tokens'"):
        _retrain("--method", "kd", "--teacher", "p")


def test_max_tokens_with_lora_is_refused_naming_the_methods() -> None:
    from shortened.admission import AdmissionError

    with pytest.raises(AdmissionError, match="--max-tokens applies to methods cpt, cpt_lora, kd"):
        _retrain("--method", "lora", "--max-tokens", "1000")


def test_readme_command_lines_parse() -> None:
    """The command lines of the README's "Command line" section build their specs."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    lines = re.findall(r"\.venv/bin/shortened ((?:[^\n]*\\\n)*[^\n]*)", section)
    specs = {
        "prune": prune_spec,
        "retrain": retrain_spec,
        "eval": eval_spec,
        "export": export_spec,
    }
    assert {line.split()[0] for line in lines} >= set(specs)
    for line in lines:
        argv = shlex.split(line.replace("\\\n", " "), comments=True)
        args = build_parser().parse_args(argv)
        specs[args.command](args)


def test_eval_summary_prints_the_reports_deltas() -> None:
    from shortened.cli.eval_command import _eval_summary

    result = {
        "source": "m",
        "num_layers": 2,
        "params": 10,
        "weight_bytes": 40,
        "perplexity": {"t.txt": {"windows": 4, "ppl": 12.0}},
        "zero_shot": {"tasks": {"piqa": {"metric": "acc", "value": 0.5}}, "mean_accuracy": 0.5},
    }
    baseline = {**result, "source": "parent", "num_layers": 3}
    # Deltas unlike any recomputation from the two results: the summary reads them as given.
    deltas = {
        "perplexity": {"t.txt": {"model": 12.0, "baseline": 10.0, "delta": 7.25, "ratio": 1.2}},
        "zero_shot": {
            "tasks": {"piqa": {"metric": "acc", "model": 0.5, "baseline": 0.75, "delta": -0.125}},
            "mean_accuracy": {"model": 0.5, "baseline": 0.75, "delta": -0.375},
        },
    }
    text = _eval_summary({"model": result, "baseline": baseline, "deltas": deltas})
    assert "7.25" in text and "-0.125" in text and "-0.375" in text
    alone = _eval_summary({"model": result, "baseline": None, "deltas": None})
    assert "delta" not in alone and "baseline" not in alone
