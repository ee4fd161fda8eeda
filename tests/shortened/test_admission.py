"""Admission: a job that cannot run is refused before it is queued (and, on the command
line, before torch is imported), with the field and the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import boto3
import pytest

from shortened.admission import (
    Lookups,
    active_params,
    layer_param_list,
    s3_lookups,
    total_params,
)
from shortened.engine.architectures import adapter_for
from shortened.engine.models import count_parameters
from shortened.kinds import problems
from shortened.specs import EvalSpec, PruneSpec, RetrainSpec
from tests.helpers import CALIBRATION, FAMILY_CONFIGS, HELDOUT, TINY_MODEL, tiny_model


def prune(**overrides) -> PruneSpec:
    spec = {"model": str(TINY_MODEL), "num_blocks": 2, "calibration": {"source": str(CALIBRATION)}}
    return PruneSpec.model_validate({**spec, **overrides})


def fields(found) -> dict[str, str]:
    return {p.field: p.message for p in found}


def test_a_runnable_spec_has_no_problems() -> None:
    assert problems("prune", prune()) == []
    assert problems("prune", prune(num_blocks=None, target_ratio=0.2)) == []
    spec = EvalSpec(model=str(TINY_MODEL), perplexity={"datasets": ["wikitext2", str(HELDOUT)]})
    assert problems("eval", spec) == []


def test_model_problems(tmp_path) -> None:
    assert (
        "does not exist" in fields(problems("prune", prune(model=str(tmp_path / "nope"))))["model"]
    )
    (tmp_path / "empty").mkdir()
    assert (
        "no config.json" in fields(problems("prune", prune(model=str(tmp_path / "empty"))))["model"]
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert (
        "not readable JSON"
        in fields(problems("prune", prune(model=str(tmp_path / "bad"))))["model"]
    )
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    message = fields(problems("prune", prune(model=str(tmp_path / "bert"))))["model"]
    assert "'bert' is not supported" in message and "Llama" in message


def test_targets_checked_against_the_layer_count() -> None:
    # 12 blocks, 4 + 2 protected: 6 removable.
    assert "at most 6 can go" in fields(problems("prune", prune(num_blocks=7)))["num_blocks"]
    assert (
        "at least one must remain" in fields(problems("prune", prune(num_blocks=12)))["num_blocks"]
    )
    no_protection = prune(num_blocks=11, protect_first=0, protect_last=0)
    assert problems("prune", no_protection) == []
    everything = prune(num_blocks=2, protect_first=8, protect_last=4)
    assert "nothing left to prune" in fields(problems("prune", everything))["protect_first"]
    too_much = fields(problems("prune", prune(num_blocks=None, target_ratio=0.9)))["target_ratio"]
    assert "at most 6 blocks" in too_much
    too_little = fields(problems("prune", prune(num_blocks=None, target_ratio=0.001)))
    assert "less than half of one block" in too_little["target_ratio"]


def test_data_files(tmp_path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notes.md").write_text("text")
    cases = {
        str(tmp_path / "missing.jsonl"): "does not exist",
        str(tmp_path / "empty.jsonl"): "is empty",
        str(tmp_path / "notes.md"): "'.md' files are not supported",
    }
    for source, reason in cases.items():
        found = fields(problems("prune", prune(calibration={"source": source})))
        assert reason in found["calibration.source"], found
    retrain = RetrainSpec.model_validate(
        {
            "model": str(TINY_MODEL),
            "method": "lora",
            "data": {
                "source": str(tmp_path / "missing.jsonl"),
                "validation_source": str(tmp_path / "empty.jsonl"),
            },
        }
    )
    assert set(fields(problems("retrain", retrain))) == {"data.source", "data.validation_source"}
    evaluation = EvalSpec(
        model=str(TINY_MODEL),
        compare_with=str(tmp_path / "parent"),
        perplexity={"datasets": ["wikitext2", str(tmp_path / "missing.txt")]},
    )
    assert set(fields(problems("eval", evaluation))) == {"compare_with", "perplexity.datasets.1"}
    # Pipeline sections are checked at the door too.
    pipeline = prune(
        retrain={"method": "lora", "data": {"source": str(tmp_path / "missing.jsonl")}},
        eval={"perplexity": {"datasets": [str(tmp_path / "missing.txt")]}},
    )
    assert set(fields(problems("prune", pipeline))) == {
        "retrain.data.source",
        "eval.perplexity.datasets.0",
    }


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_parameter_estimates_match_the_real_model(model_type: str) -> None:
    """The target-ratio check and the planner count parameters from config.json alone; the
    counts must agree with the instantiated model of every supported family: each block,
    the whole model, and the parameters active per token (top-k of the routed experts)."""
    model = tiny_model(model_type)
    config = model.config.to_dict()
    layers = adapter_for(model).layers(model)
    assert layer_param_list(config) == [count_parameters(block) for block in layers]
    assert total_params(config) == count_parameters(model)
    assert active_params(config) == count_parameters(model) - sum(
        _inactive_expert_params(model, block) for block in layers
    )


def _inactive_expert_params(model, block) -> int:
    """The routed experts a token does not use, from the instantiated block: (experts -
    top_k) / experts of every expert tensor (the router and shared experts always run)."""
    moe = adapter_for(model).moe
    try:
        experts = block.get_submodule(moe.experts) if moe is not None else None
    except AttributeError:  # a dense block of an MoE family
        experts = None
    if experts is None:
        return 0
    top_k = block.get_submodule(moe.router).top_k
    tensors = list(experts.parameters())
    count = tensors[0].shape[0]
    return sum(p.numel() for p in tensors) * (count - top_k) // count


def test_object_storage_lookups(s3_server) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="admission")
    s3.put_object(
        Bucket="admission", Key="m/config.json", Body=(TINY_MODEL / "config.json").read_bytes()
    )
    s3.put_object(Bucket="admission", Key="data/calib.jsonl", Body=CALIBRATION.read_bytes())
    s3.put_object(Bucket="admission", Key="data/empty.jsonl", Body=b"")
    lookups = s3_lookups(s3_server)
    ok = prune(model="s3://admission/m/", calibration={"source": "s3://admission/data/calib.jsonl"})
    assert problems("prune", ok, lookups) == []
    # The config is read from the store: the layer count is checked as for a local model.
    assert (
        "at most 6 can go"
        in fields(problems("prune", ok.model_copy(update={"num_blocks": 9}), lookups))["num_blocks"]
    )
    bad = prune(
        model="s3://admission/other/", calibration={"source": "s3://admission/data/empty.jsonl"}
    )
    found = fields(problems("prune", bad, lookups))
    assert "s3://admission/other/config.json does not exist" in found["model"]
    assert "is empty" in found["calibration.source"]


def test_an_unreachable_store_is_not_held_against_the_job() -> None:
    lookups = s3_lookups("http://127.0.0.1:9", timeout_s=0.5)  # nothing listens there
    spec = prune(model="s3://b/m/", calibration={"source": "s3://b/calib.jsonl"})
    assert problems("prune", spec, lookups) == []


def test_job_sources_use_the_resolver() -> None:
    configs = {"done": json.loads((TINY_MODEL / "config.json").read_text())}

    def job_config(job_id: str):
        from shortened.admission import Missing

        if job_id not in configs:
            raise Missing(f"job {job_id} does not exist")
        return configs[job_id]

    lookups = Lookups(job_config=job_config)
    assert problems("prune", prune(model="job://done"), lookups) == []
    assert (
        "job nope does not exist"
        in fields(problems("prune", prune(model="job://nope"), lookups))["model"]
    )


def test_cli_refuses_before_importing_torch(tmp_path) -> None:
    code = (
        "import sys\n"
        "from shortened.cli import main\n"
        f"rc = main(['prune', '--model', {str(TINY_MODEL)!r}, '--num-blocks', '20',\n"
        f"           '--calibration', {str(CALIBRATION)!r}, '--output', {str(tmp_path / 'out')!r}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "shortened prune: error: num_blocks: cannot remove 20 blocks: the model has 12 blocks, "
        "6 of them protected (protect_first 4, protect_last 2); at least one must remain"
    ]
    assert not (tmp_path / "out").exists()
    print(f"CLI refusal took {elapsed:.2f} s")


def test_a_vision_language_checkpoint_is_pruned_not_retrained(tmp_path) -> None:
    model = tiny_model("llava", num_layers=4)
    model.config.save_pretrained(tmp_path / "vlm")  # admission reads config.json alone
    source = str(tmp_path / "vlm")
    data = {"source": str(CALIBRATION)}
    retrain = RetrainSpec(model=source, method="lora", data=data, max_steps=1)
    assert "vision-language" in fields(problems("retrain", retrain))["model"]
    pipeline = PruneSpec.model_validate(
        {"model": source, "criterion": "magnitude", "num_blocks": 1, "protect_first": 0,
         "protect_last": 0, "retrain": {"method": "lora", "data": data, "max_steps": 1}}
    )  # fmt: skip
    assert "vision-language" in fields(problems("prune", pipeline))["retrain"]
    assert problems("prune", pipeline.model_copy(update={"retrain": None})) == []
