"""The stages of a retrain run, each a short sequence of steps: its data (tokenized examples
for LoRA, packed blocks for CPT and KD), the model set up for it (every weight, or a LoRA
adapter; for KD the frozen teacher too), then ``train_stage``. A cpt_lora run keeps its CPT
model on disk: it is the adapter's base and what a resumed run's LoRA stage starts from.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortened.specs import CptSpec, RetrainSpec

from ..errors import DataError
from ..models import load_model
from ..outputs import PhaseTimer, save_model
from ..progress import Progress, ProgressCallback
from ..quality_gate import first_items, items_perplexity, measure_parent
from ..retrain_data import StageData, build_stage_data
from .checkpoints import is_main_process
from .lora import wrap_lora
from .parallel import unshard_run
from .run import RetrainRun
from .trainer import Distillation, StageSettings, train_stage

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

CPT_DEFAULT_SEQ_LEN = 2048


def _packed_seq_len(stage: CptSpec, model: Any) -> int:
    """The packed block length of a CPT or KD stage."""
    if stage.seq_len is not None:
        return stage.seq_len
    return min(
        CPT_DEFAULT_SEQ_LEN,
        int(getattr(model.config, "max_position_embeddings", CPT_DEFAULT_SEQ_LEN)),
    )


def _packed_max_steps(spec: RetrainSpec, stage: CptSpec, seq_len: int) -> int:
    """A CPT or KD stage's optimizer steps: its step budget, or its token budget in steps."""
    steps = stage.max_steps or math.ceil((stage.max_tokens or 0) / (spec.batch_size * seq_len))
    return min(steps, spec.max_steps) if spec.max_steps else steps


def _packed_settings(
    name: str,
    spec: RetrainSpec,
    stage: CptSpec,
    seq_len: int,
    extra: dict[str, Any] | None = None,
) -> StageSettings:
    """A CPT or KD stage's settings: one epoch over packed blocks, cosine schedule, the step
    or token budget; ``extra`` adds to the stage's report entry."""
    return StageSettings(
        name,
        stage.learning_rate,
        stage.warmup_steps,
        "cosine",
        _packed_max_steps(spec, stage, seq_len),
        1.0,
        seq_len,
        weight_decay=stage.weight_decay,
        extra={"seq_len": seq_len, "max_tokens": stage.max_tokens, **(extra or {})},
        packed=True,
    )


def _packed_data(
    run: RetrainRun,
    stage: CptSpec,
    name: str,
    progress: ProgressCallback,
    store: ArtifactStore | None,
    cache_dir: Path | None,
) -> tuple[StageData, int]:
    """A CPT or KD stage's data: its corpus (else the spec's ``data``) in packed blocks."""
    seq_len = _packed_seq_len(stage, run.model)
    progress(Progress("data", message=f"{name}: packing into {seq_len}-token blocks"))
    data = build_stage_data(
        stage.data or run.spec.data,
        run.train_tokenizer,
        kind="cpt",
        length=seq_len,
        seed=run.spec.seed,
        store=store,
        cache_dir=cache_dir,
    )
    return data, seq_len


def run_cpt_stage(
    run: RetrainRun,
    *,
    progress: ProgressCallback,
    store: ArtifactStore | None,
    cache_dir: Path | None,
    timer: PhaseTimer,
) -> None:
    """Full-parameter training on packed blocks (or, resumed after it finished, its report)."""
    spec, model = run.spec, run.model
    assert spec.cpt is not None
    if run.cpt_already_done:
        assert run.cpt_done_dir is not None
        stage = json.loads((run.cpt_done_dir / "stage_report.json").read_text())
        run.stages.append(stage)
        run.trainable["cpt"] = stage.get("trainable_params", 0)
        return
    cpt_data, seq_len = _packed_data(run, spec.cpt, "cpt", progress, store, cache_dir)
    timer("cpt_data_s")
    settings = _packed_settings("cpt", spec, spec.cpt, seq_len)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    stage = _train(run, model, cpt_data, settings, progress=progress, timer=timer)
    model.eval()
    if spec.method == "cpt_lora":
        _keep_cpt_model(run, stage)


def _keep_cpt_model(run: RetrainRun, stage: dict[str, Any]) -> None:
    """The LoRA stage edits the modules in place: keep the CPT model on disk (it is the
    adapter's base, and what a resumed run starts its LoRA stage from)."""
    done_dir = run.cpt_done_dir
    if done_dir is None:
        run.scratch_cpt = Path(tempfile.mkdtemp(prefix="shortened-cpt-"))
    target = done_dir or run.scratch_cpt
    assert target is not None
    if is_main_process():
        save_model(
            run.model,
            run.loaded.tokenizer,
            target,
            run.loaded.source_dtype,
            max_shard_size=run.spec.max_shard_size or run.loaded.source_shard_size,
        )
        (target / "stage_report.json").write_text(json.dumps(stage, indent=2))
        if done_dir is not None:  # its Trainer checkpoints are superseded
            for finished in done_dir.parent.glob("checkpoint-*"):
                shutil.rmtree(finished, ignore_errors=True)


def run_lora_stage(
    run: RetrainRun,
    *,
    progress: ProgressCallback,
    store: ArtifactStore | None,
    cache_dir: Path | None,
    timer: PhaseTimer,
) -> None:
    """A peft LoRA wrapper around the model, trained on tokenized examples."""
    spec = run.spec
    progress(Progress("data", message=f"lora: tokenizing (cutoff {spec.cutoff_len})"))
    lora_data = build_stage_data(
        spec.data,
        run.train_tokenizer,
        kind="lora",
        length=spec.cutoff_len,
        seed=spec.seed,
        store=store,
        cache_dir=cache_dir,
    )
    if lora_data.train_items is None and spec.max_steps is None:
        raise DataError("a streamed dataset has no known length: give max_steps")
    timer("lora_data_s")
    lora_info = wrap_lora(run)
    settings = StageSettings(
        "lora",
        spec.learning_rate,
        spec.warmup_steps,
        "linear",
        spec.max_steps,
        spec.epochs,
        spec.cutoff_len,
        extra={"cutoff_len": spec.cutoff_len, "lora": lora_info},
    )
    _train(run, run.peft_model, lora_data, settings, progress=progress, timer=timer)


def run_kd_stage(
    run: RetrainRun,
    *,
    progress: ProgressCallback,
    store: ArtifactStore | None,
    cache_dir: Path | None,
    timer: PhaseTimer,
) -> None:
    """Distillation from the teacher on packed raw text: every weight, or a LoRA adapter."""
    from ..distillation import KdLoss, check_same_vocabulary, load_teacher

    spec = run.spec
    kd = spec.kd
    assert kd is not None and kd.teacher is not None
    progress(Progress("loading", message=f"teacher {kd.teacher}"))
    teacher = load_model(
        kd.teacher,
        dtype=str(run.precision.weights).removeprefix("torch."),
        device=str(run.load_device),
        store=store,
        cache_dir=cache_dir,
    )
    check_same_vocabulary(
        run.model, run.loaded.tokenizer, teacher.model, teacher.tokenizer, kd.teacher
    )
    timer("teacher_load_s")
    kd_data, seq_len = _packed_data(run, kd, "kd", progress, store, cache_dir)
    timer("kd_data_s")
    extra: dict[str, Any] = {
        "teacher": kd.teacher,
        "alpha": kd.alpha,
        "temperature": kd.temperature,
        "chunk_size": kd.chunk_size,
    }
    if kd.lora:
        extra["lora"] = wrap_lora(run)
        model = run.peft_model
    else:
        model = run.model
        model.train()
        model.requires_grad_(True)
    settings = _packed_settings("kd", spec, kd, seq_len, extra)
    distill = Distillation(
        load_teacher(teacher.model), KdLoss(kd.alpha, kd.temperature, kd.chunk_size)
    )
    _train(run, model, kd_data, settings, progress=progress, timer=timer, distill=distill)
    run.model.eval()


def _train(
    run: RetrainRun,
    model: Any,
    data: StageData,
    settings: StageSettings,
    *,
    progress: ProgressCallback,
    timer: PhaseTimer,
    distill: Distillation | None = None,
) -> dict[str, Any]:
    """Train one stage and record its report entry and trainable-parameter count."""
    if run.gate is None:  # the first stage that trains (a resumed cpt_lora: its LoRA stage)
        _measure_parent(run, data, progress)
    run.trainable[settings.name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stage = train_stage(
        model,
        run.train_tokenizer,
        data,
        settings,
        run.spec,
        run.precision,
        run.device,
        stage_dir=run.stage_dir(settings.name),
        resume=run.resume,
        progress=progress,
        distill=distill,
    )
    unshard_run(run, model)  # FSDP: rank 0 gathers the trained model (a no-op otherwise)
    stage["trainable_params"] = run.trainable[settings.name]
    run.stages.append(stage)
    timer(f"{settings.name}_train_s")
    return stage


def _measure_parent(run: RetrainRun, data: StageData, progress: ProgressCallback) -> None:
    """The quality gate's parent side, before anything trains: the untrained model's
    perplexity on the first stage's first validation items (else training items)."""
    gate_spec = run.spec.quality_gate
    if gate_spec.max_ppl_ratio is None:
        return
    held_out = data.eval is not None
    run.gate_items = first_items(data.eval if held_out else data.train, gate_spec.windows)
    source = "validation data" if held_out else "training data (no validation split)"
    progress(Progress("quality_gate", message=f"parent on {len(run.gate_items)} items"))
    parent = run.loaded.model  # a cpt_lora run resumed after CPT trains a copy of it
    run.gate = measure_parent(
        gate_spec, lambda: items_perplexity(parent, run.gate_items), len(run.gate_items), source
    )
