"""Retraining over two processes under torchrun (gloo on CPU, the tiny model): DDP and FSDP2
follow one process's loss curve at the same global batch, for CPT, LoRA and KD; a rank
killed mid-run fails the attempt and the next attempt resumes from the last checkpoint;
cancelling ends every process of the launch.

Every step's global batch is the whole training set (16 packed blocks, or 8 Alpaca
examples), so the ranks' shares of it are the same examples one process sees, and the
curves may differ only by the order of floating-point sums: within ``LOSS_RTOL``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shortened.engine.errors import Cancelled, DataError, TrainingProcessFailed
from shortened.engine.retrain import retrain_model
from shortened.specs import RetrainSpec
from tests.helpers import TINY_MODEL

DATA = TINY_MODEL.parent.parent / "data"
TEXT = DATA / "stdlib_docs_train.jsonl"
ALPACA = DATA / "alpaca_tiny.jsonl"
# Measured: at most 4e-6 relative (KD on FSDP; CPT and LoRA agree to 1e-7); a wrong global
# batch, a rank padding its share, or unsynchronised gradients differ by more than 1e-2.
LOSS_RTOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def packed_spec(processes: int = 1, strategy: str = "fsdp", **overrides) -> RetrainSpec:
    """CPT on 16 blocks of 64 tokens (3 records), the whole set in every step's batch."""
    settings = {
        "model": str(TINY_MODEL),
        "method": "cpt",
        "data": {"source": str(TEXT), "max_records": 3},
        "cpt": {"max_steps": 3, "seq_len": 64, "warmup_steps": 0, "learning_rate": 1e-3},
        "micro_batch_size": 4,
        "batch_size": 16,
        "logging_steps": 1,
        "save_steps": 2,
        "seed": 1,  # with it the 3 records pack into exactly 16 blocks
        "quality_gate": {"max_ppl_ratio": None},
        "distributed": {"nproc_per_node": processes, "strategy": strategy},
    }
    settings.update(overrides)
    return RetrainSpec.model_validate(settings)


def lora_spec(processes: int = 1, strategy: str = "fsdp") -> RetrainSpec:
    return RetrainSpec.model_validate(
        {
            "model": str(TINY_MODEL),
            "method": "lora",
            "data": {"source": str(ALPACA), "max_records": 8},
            "lora": {"dropout": 0.0},  # dropout draws differ per rank
            "cutoff_len": 256,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "max_steps": 3,
            "micro_batch_size": 2,
            "batch_size": 8,
            "logging_steps": 1,
            "save_steps": 100,
            "seed": 3,
            "quality_gate": {"max_ppl_ratio": None},
            "distributed": {"nproc_per_node": processes, "strategy": strategy},
        }
    )


def curve(report: dict) -> list[float]:
    return [loss for stage in report["stages"] for _, loss in stage["loss_history"]]


def assert_same_curve(report: dict, baseline: dict) -> None:
    got, want = curve(report), curve(baseline)
    assert report["stages"][0]["train_items"] == baseline["stages"][0]["train_items"]
    assert baseline["stages"][0]["train_items"] in (8, 16)  # one global batch: no rank pads
    assert len(got) == len(want) >= 3
    assert got == pytest.approx(want, rel=LOSS_RTOL)
    assert want[0] != pytest.approx(want[-1], rel=1e-2)  # it trained: the curve moves


def assert_same_weights(a, b, atol: float = 1e-4) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=atol, rtol=1e-3)


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """One process's CPT and LoRA runs (the curves two ranks must follow)."""
    root = tmp_path_factory.mktemp("one-process")
    return {
        "cpt": (retrain_model(packed_spec(), root / "cpt"), root / "cpt"),
        "lora": (retrain_model(lora_spec(), root / "lora"), root / "lora"),
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_follow_one_process_cpt_curve(strategy, baselines, tmp_path):
    baseline, baseline_dir = baselines["cpt"]
    seen: list = []
    report = retrain_model(packed_spec(2, strategy), tmp_path / "out", progress=seen.append)
    assert_same_curve(report, baseline)
    stage = report["stages"][0]
    assert stage["world_size"] == 2 and stage["gradient_accumulation_steps"] == 2
    assert stage["effective_batch_size"] == baseline["stages"][0]["effective_batch_size"] == 16
    # rank 0 gathered the (sharded) model and saved it whole, as one process does
    assert_same_weights(tmp_path / "out", baseline_dir)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["hyperparameters"]["distributed"]["strategy"] == strategy
    # the parent forwarded rank 0's progress: every step, in order
    steps = [update.done for update in seen if update.stage == "training"]
    assert steps and steps[-1] == 3 and steps == sorted(steps)


def test_fsdp_lora_follows_one_process_and_saves_adapter_and_merged_model(baselines, tmp_path):
    baseline, baseline_dir = baselines["lora"]
    report = retrain_model(lora_spec(2, "fsdp"), tmp_path / "out")
    assert_same_curve(report, baseline)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert_same_weights(tmp_path / "out", baseline_dir)  # the merged model
    assert report["trainable_params"] == baseline["trainable_params"]


def test_cpt_lora_on_two_fsdp_ranks_hands_the_cpt_model_to_every_rank(baselines, tmp_path):
    baseline, _ = baselines["cpt"]
    spec = packed_spec(2, "fsdp", method="cpt_lora", lora={"dropout": 0.0}, max_steps=3)
    report = retrain_model(spec, tmp_path / "out")
    cpt, lora = report["stages"]
    # the CPT stage is the CPT baseline's; the LoRA stage starts on every rank from its model
    assert [loss for _, loss in cpt["loss_history"]] == pytest.approx(
        curve(baseline), rel=LOSS_RTOL
    )
    assert lora["steps"] == 3 and lora["world_size"] == 2
    merged = load_file(tmp_path / "out" / "model.safetensors")
    cpt_model = load_file(tmp_path / "out" / "cpt" / "model.safetensors")
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    changed = [name for name in cpt_model if not torch.equal(merged[name], cpt_model[name])]
    assert changed and all("proj" in name for name in changed)  # the adapter, merged


def test_kd_on_two_fsdp_ranks_shards_the_teacher_and_follows_one_process(tmp_path):
    student = tmp_path / "student"  # tiny-llama without 4 of its 12 blocks
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    model.model.layers = model.model.layers[:4] + model.model.layers[8:]
    model.config.num_hidden_layers = 8
    model.save_pretrained(student)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the same blocks as the parent's
        shutil.copy(TINY_MODEL / name, student / name)
    kd = {"teacher": str(TINY_MODEL), "max_steps": 3, "seq_len": 64, "warmup_steps": 0}
    settings = {
        "model": str(student),
        "method": "kd",
        "cpt": None,
        "kd": kd | {"learning_rate": 1e-3},
    }
    one = retrain_model(packed_spec(**settings), tmp_path / "one")
    two = retrain_model(packed_spec(2, "fsdp", **settings), tmp_path / "two")
    assert_same_curve(two, one)
    assert two["stages"][0]["teacher"] == str(TINY_MODEL)
    assert_same_weights(tmp_path / "two", tmp_path / "one")


def launch_processes() -> list[psutil.Process]:
    """This test's torchrun and its ranks."""
    return [
        child
        for child in psutil.Process().children(recursive=True)
        if "torch.distributed.run" in " ".join(child.cmdline())
        or "rank_main" in " ".join(child.cmdline())
    ]


def rank_process(rank: int) -> psutil.Process:
    for child in launch_processes():
        if "torch.distributed.run" not in " ".join(child.cmdline()) and child.environ().get(
            "RANK"
        ) == str(rank):
            return child
    raise AssertionError(f"no rank {rank} running")


def gone(processes: list[psutil.Process], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes):
            return True
        time.sleep(0.2)
    return False


def test_killed_rank_fails_the_attempt_and_the_next_resumes_from_its_checkpoint(tmp_path):
    spec = packed_spec(2, "fsdp", cpt={"max_steps": 6, "seq_len": 64, "warmup_steps": 0})
    checkpoints = tmp_path / "checkpoints"
    started: list[psutil.Process] = []

    def kill_rank_1_after_a_checkpoint(update) -> None:
        if update.stage == "training" and update.done >= 3 and not started:
            started.extend(launch_processes())
            os.kill(rank_process(1).pid, signal.SIGKILL)

    with pytest.raises(TrainingProcessFailed, match="rank 1 exited with -9") as failed:
        retrain_model(
            spec,
            tmp_path / "out",
            progress=kill_rank_1_after_a_checkpoint,
            checkpoint_dir=checkpoints,
        )
    assert failed.value.code == "training_process_failed" and failed.value.retryable
    assert started and gone(started)  # torchrun ended rank 0 too
    assert not (tmp_path / "out").exists()
    saved = sorted(p.name for p in (checkpoints / "cpt").glob("checkpoint-*"))
    assert "checkpoint-2" in saved
    assert (checkpoints / "cpt" / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # sharded

    seen: list = []
    report = retrain_model(spec, tmp_path / "out", progress=seen.append, checkpoint_dir=checkpoints)
    resumed = report["stages"][0]["resumed_from_step"]
    assert resumed in (2, 4) and report["steps"] == 6
    steps = [update.done for update in seen if update.stage == "training"]
    assert steps[0] == resumed and 1 not in steps  # nothing before the checkpoint was redone


def test_cancel_ends_every_rank_and_publishes_nothing(tmp_path):
    started: list[psutil.Process] = []

    def cancel_at_step_2(update) -> None:
        if update.stage == "training" and update.done >= 2:
            started.extend(launch_processes())
            raise Cancelled("cancelled by the test")

    spec = packed_spec(2, "ddp", cpt={"max_steps": 20, "seq_len": 64, "warmup_steps": 0})
    with pytest.raises(Cancelled):
        retrain_model(spec, tmp_path / "out", progress=cancel_at_step_2)
    assert len(started) == 3  # torchrun and both ranks were running
    assert gone(started, timeout_s=1.0)  # ended before retrain_model returned
    assert not (tmp_path / "out").exists()


def test_a_ranks_engine_error_is_raised_as_itself(tmp_path):
    spec = packed_spec(2, "ddp", data={"source": str(tmp_path / "missing.jsonl")})
    with pytest.raises(DataError, match="missing.jsonl"):
        retrain_model(spec, tmp_path / "out")
