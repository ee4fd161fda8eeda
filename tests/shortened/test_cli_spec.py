"""The engine commands take their defaults, choices and help from the spec models: a command
run with only the required options builds the spec the model's defaults make, and every
option names the spec's default and choices, so a changed spec default cannot drift."""

from __future__ import annotations

import argparse
from typing import get_args

import pytest

from shortened.cli import build_parser
from shortened.cli.engine_commands import eval_spec, prune_spec, retrain_spec
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
CLI_ONLY_FLAGS = {"help", "no_protect", "no_merge", "no_resume", "efficiency", "greedy", "dry_run"}

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


def test_bad_choice_is_refused_naming_the_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["prune", "--model", "m", "--num-blocks", "1", "--criterion", "nope", "--output", "o"]
        )
    assert "invalid choice: 'nope'" in capsys.readouterr().err
