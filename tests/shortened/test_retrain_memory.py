"""The planner's retrain stages per device: FSDP divides weights, gradients and AdamW states
by the processes and adds the units it gathers; DDP replicates them and adds its gradient
buckets; KD counts the parent as teacher; a job too large for one device is told how many
it needs. On a Llama-3-70B-shaped config (``bench/configs/llama-3-70b.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shortened.kinds import parse_spec, plan_job
from shortened.planning import GB, insufficient_memory
from shortened.retrain_memory import (
    devices_to_fit,
    resolve_processes,
    spread_over,
    too_many_processes,
)

CONFIG = json.loads(
    (Path(__file__).parents[2] / "bench" / "configs" / "llama-3-70b.json").read_text()
)
PARAMS = 70_553_706_496  # Llama-3-70B's published parameter count


def kd_pipeline(processes=1, strategy="fsdp", lora=False):
    """Prune 16 of the 80 blocks, then distil from the parent on 2048-token blocks."""
    return parse_spec(
        "prune",
        {
            "model": "/models/llama-3-70b",
            "criterion": "ppl",
            "num_blocks": 16,
            "calibration": {"source": "/data/c.jsonl", "n_samples": 10, "seq_len": 128},
            "retrain": {
                "method": "kd",
                "dtype": "bfloat16",
                "data": {"source": "/data/corpus.jsonl"},
                "micro_batch_size": 1,
                "batch_size": 64,
                "kd": {"max_tokens": 10**8, "seq_len": 2048, "lora": lora},
                "distributed": {"nproc_per_node": processes, "strategy": strategy},
            },
        },
    )


def kd_stage(plan):
    [stage] = [s for s in plan.stages if s.name.startswith("retrain kd")]
    return stage


def parts(stage) -> dict[str, float]:
    """The formula's named terms, in GB."""
    terms = stage.formula.removesuffix(" GB").split(" + ")
    return {term.rsplit(" ", 1)[0]: float(term.rsplit(" ", 1)[1]) for term in terms}


def test_fsdp_divides_the_training_states_and_ddp_replicates_them():
    one = kd_stage(plan_job("prune", kd_pipeline(), CONFIG, "cuda"))
    fsdp = kd_stage(plan_job("prune", kd_pipeline(8), CONFIG, "cuda"))
    ddp = kd_stage(plan_job("prune", kd_pipeline(8, "ddp"), CONFIG, "cuda"))
    assert fsdp.per_device and fsdp.name == "retrain kd (fsdp, 8 devices, per device)"
    single, sharded, replicated = parts(one), parts(fsdp), parts(ddp)
    states = single["student weights+grads+adamw"]
    # the pruned student (64 blocks) in bf16: weights, gradients and AdamW's two states
    student = 56_863_236_096
    assert states == pytest.approx(4 * 2 * student / GB, abs=0.01)
    assert sharded["student weights+grads+adamw/8"] == pytest.approx(states / 8, abs=0.01)
    # the teacher is the unpruned parent, frozen: its weights only, sharded like the student
    assert single["teacher"] == pytest.approx(2 * PARAMS / GB, abs=0.01)
    assert sharded["teacher/8"] == pytest.approx(single["teacher"] / 8, abs=0.01)
    # gathered whole while computing: two 80-layer-model blocks and the embeddings + head
    assert 3 < sharded["gathered student units"] < 10
    assert replicated["student weights+grads+adamw"] == states
    assert replicated["ddp gradient buckets"] == pytest.approx(2 * student / GB, abs=0.01)
    assert sharded["activations"] == single["activations"]  # each rank has its micro-batch
    assert fsdp.peak_bytes < one.peak_bytes / 5 and ddp.peak_bytes > one.peak_bytes


def test_a_retrain_plan_names_its_processes_and_strategy():
    spec = parse_spec(
        "retrain",
        {
            "model": "/models/x",
            "method": "lora",
            "data": {"source": "/data/a.jsonl"},
            "distributed": {"nproc_per_node": 4, "strategy": "ddp"},
        },
    )
    plan = plan_job("retrain", spec, CONFIG, "cuda")
    assert (plan.processes, plan.strategy) == (4, "ddp")
    assert plan.to_dict()["processes"] == 4
    assert plan.stages[-1].name == "retrain lora (ddp, 4 devices, per device)"


def test_a_job_too_large_for_the_workers_is_told_how_many_devices_would_hold_it():
    limit = 80 * GB
    spec = kd_pipeline(8)
    plan = plan_job("prune", spec, CONFIG, "cuda")
    message = insufficient_memory(plan, limit, devices=8)
    assert message and "retrain kd (fsdp, 8 devices, per device)" in message
    assert "80.0 GB per device (8 devices)" in message

    def plan_for(n):
        return plan_job("prune", spread_over(spec, n), CONFIG, "cuda")

    needed = devices_to_fit(plan_for, limit, 64)
    assert needed is not None and needed > 8
    assert insufficient_memory(plan_for(needed), limit, needed) is None
    assert insufficient_memory(plan_for(needed - 1), limit, needed - 1) is not None
    hinted = insufficient_memory(plan, limit, 8, needed)
    assert hinted and f"{{nproc_per_node: {needed}, strategy: fsdp}}" in hinted
    # an adapter-only KD fits the eight: the load and scoring spread over the devices
    lora = plan_job("prune", kd_pipeline(8, lora=True), CONFIG, "cuda")
    assert insufficient_memory(lora, limit, devices=8) is None
    assert insufficient_memory(lora, limit, devices=1) is not None  # 141 GB of weights


def test_auto_is_planned_as_the_workers_devices_and_more_is_refused():
    auto = kd_pipeline("auto")
    assert resolve_processes(auto, 8).retrain.distributed.nproc_per_node == 8
    assert resolve_processes(auto, None).retrain.distributed.nproc_per_node == 1
    assert too_many_processes(kd_pipeline(8), 8) is None
    assert too_many_processes(kd_pipeline(8), None) is None  # no devices declared: no check
    loc, message = too_many_processes(kd_pipeline(16), 8)
    assert loc == ["retrain", "distributed", "nproc_per_node"]
    assert "16 training processes" in message and "8 device(s)" in message
