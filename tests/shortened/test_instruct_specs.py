"""Instruct data at the door: ``chat_template`` on calibration, training and agreement data
is refused at admission for a local model whose tokenizer has no chat template, an
agreement prompt file is checked like every data file, and the command line's options fill
the spec fields."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from shortened.cli import build_parser
from shortened.cli.eval_command import eval_spec
from shortened.cli.prune_command import prune_spec
from shortened.cli.retrain_command import retrain_spec
from shortened.kinds import problems
from shortened.specs import EvalSpec, PipelineEval, PruneSpec, RetrainSpec
from tests.helpers import CALIBRATION, TINY_MODEL

ALPACA = Path(TINY_MODEL).parents[1] / "data" / "alpaca_tiny.jsonl"


def fields(found) -> dict[str, str]:
    return {p.field: p.message for p in found}


def chat_copy(tmp_path: Path, how: str) -> str:
    """The tiny model with a chat template in tokenizer_config.json or its own file."""
    dest = tmp_path / f"chat-{how}"
    shutil.copytree(TINY_MODEL, dest)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    if how == "config":
        config = json.loads((dest / "tokenizer_config.json").read_text())
        (dest / "tokenizer_config.json").write_text(
            json.dumps({**config, "chat_template": template})
        )
    else:
        (dest / "chat_template.jinja").write_text(template)
    return str(dest)


def specs(model: str) -> dict[str, tuple[str, object]]:
    calibration = {"source": str(CALIBRATION), "chat_template": True}
    data = {"source": str(ALPACA), "chat_template": True}
    return {
        "calibration.chat_template": (
            "prune",
            PruneSpec(model=model, num_blocks=2, calibration=calibration),
        ),
        "data.chat_template": ("retrain", RetrainSpec(model=model, data=data)),
        "cpt.data.chat_template": (
            "retrain",
            RetrainSpec(
                model=model,
                method="cpt",
                data={"source": str(ALPACA)},
                cpt={"data": data, "max_steps": 1},
            ),
        ),
        "agreement.chat_template": (
            "eval",
            EvalSpec(model=model, compare_with=model, agreement={"prompts": str(ALPACA)}),
        ),
    }


def test_chat_template_is_refused_for_a_tokenizer_without_one() -> None:
    for field, (kind, spec) in specs(str(TINY_MODEL)).items():
        found = fields(problems(kind, spec))
        assert list(found) == [field], (field, found)
        assert "has no chat template" in found[field]


def test_chat_template_is_admitted_when_the_tokenizer_has_one(tmp_path) -> None:
    for how in ("config", "file"):
        for field, (kind, spec) in specs(chat_copy(tmp_path, how)).items():
            assert problems(kind, spec) == [], (how, field)


def test_agreement_prompts_are_checked_like_every_data_file(tmp_path) -> None:
    spec = EvalSpec(
        model=str(TINY_MODEL),
        compare_with=str(TINY_MODEL),
        agreement={"prompts": str(tmp_path / "absent.jsonl"), "chat_template": False},
    )
    assert list(fields(problems("eval", spec))) == ["agreement.prompts"]


def test_a_pipeline_eval_may_leave_the_parent_to_the_pipeline() -> None:
    section = PipelineEval(agreement={"prompts": str(ALPACA)})
    spec = section.for_model("job://abc", compare_with=str(TINY_MODEL))
    assert spec.compare_with == str(TINY_MODEL) and spec.agreement is not None


def test_command_line_options_fill_the_chat_fields() -> None:
    parse = build_parser().parse_args
    model = ["--model", "m"]
    spec = prune_spec(
        parse(
            ["prune", *model, "--num-blocks", "2", "--calibration", "c.jsonl", "--output", "o"]
            + ["--calibration-chat-template"]
        )
    )
    assert spec.calibration is not None and spec.calibration.chat_template
    spec = retrain_spec(
        parse(["retrain", *model, "--data", "d.jsonl", "--chat-template", "--output", "o"])
    )
    assert spec.data.chat_template
    args = ["eval", *model, "--compare-with", "p", "--agreement", "q.jsonl", "--max-prompts", "5"]
    spec = eval_spec(parse(args))
    assert spec.agreement is not None
    assert (spec.agreement.prompts, spec.agreement.max_prompts) == ("q.jsonl", 5)
    assert spec.agreement.chat_template
    plain = eval_spec(parse([*args, "--agreement-plain"]))
    assert plain.agreement is not None and not plain.agreement.chat_template
