"""Retraining a pruned model: LoRA, continued pretraining (CPT), CPT followed by LoRA, or
knowledge distillation from the unpruned parent (KD; the loss is in ``distillation.py``).

One readable recipe per stage, built on transformers' ``Trainer`` (so multi-GPU runs work
through accelerate/torchrun, and checkpoints/resume are Trainer's own):

    data (records -> tokenized examples or packed blocks, held-out split; ``retrain_data.py``)
      -> model (full parameters for CPT and KD, a peft LoRA wrapper for LoRA and KD with lora)
      -> Trainer (AdamW, warm-up + linear (LoRA) / cosine (CPT, KD) schedule, checkpoints;
         for KD a Trainer whose loss compares the student with the frozen teacher)
      -> outputs (merged model + adapter/, or the CPT model; report.json), written atomically.

The paper's LoRA recipe is alpaca-lora's: Alpaca prompt template, loss on the response only,
r=8, alpha=16, dropout 0.05 on every attention and MLP projection, lr 1e-4, 2 epochs, batch 64
(micro-batch 4 x gradient accumulation), cutoff 256 tokens, 100 warm-up steps.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import CptSpec, RetrainSpec

from .errors import DataError, RetrainError
from .models import LoadedModel, count_parameters, load_model, pick_device
from .outputs import PhaseTimer, atomic_output_dir, check_output_dir, library_versions, save_model
from .progress import Progress, ProgressCallback, no_progress
from .retrain_data import IGNORE_INDEX, StageData, build_stage_data

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

    from .distillation import KdLoss

log = logging.getLogger(__name__)

CPT_DEFAULT_SEQ_LEN = 2048


@dataclass
class Precision:
    """Weights dtype and Trainer mixed-precision flags of one run."""

    weights: torch.dtype
    bf16: bool = False
    fp16: bool = False

    @property
    def label(self) -> str:
        weights = str(self.weights).removeprefix("torch.")
        autocast = "bf16" if self.bf16 else "fp16" if self.fp16 else None
        return f"{weights} weights" + (f", {autocast} autocast" if autocast else "")


def choose_precision(method: str, dtype: str, device: torch.device) -> Precision:
    """CPU: fp32 (bf16 if asked). CUDA, ``auto``: CPT and KD keep fp32 master weights under
    bf16 autocast (fp16 where bf16 is unsupported); LoRA freezes the base in bf16/fp16 and
    trains fp32 adapters under autocast. Full-parameter training with fp16 weights is refused.
    ``method`` is ``lora`` for any adapter-only run (KD with ``kd.lora`` too)."""
    if method != "lora" and dtype == "float16":
        raise RetrainError(
            "full-parameter training (CPT, KD) in float16 weights is unstable; "
            "use dtype auto or bfloat16"
        )
    if device.type != "cuda":
        if dtype == "float16":
            raise RetrainError(
                "float16 training needs a CUDA device; use float32 or bfloat16 on CPU"
            )
        return (
            Precision(torch.bfloat16, bf16=True)
            if dtype == "bfloat16"
            else Precision(torch.float32)
        )
    bf16_ok = torch.cuda.is_bf16_supported()
    if dtype == "float32":
        return Precision(torch.float32)
    if dtype == "bfloat16":
        return Precision(torch.bfloat16, bf16=True)
    if dtype == "float16":
        return Precision(torch.float16, fp16=True)
    half = torch.bfloat16 if bf16_ok else torch.float16
    weights = torch.float32 if method != "lora" else half
    return Precision(weights, bf16=half == torch.bfloat16, fp16=half == torch.float16)


class ProgressReporter:
    """The TrainerCallback that turns Trainer's step/log/eval events into ``Progress`` updates.

    The engine's progress callback may raise ``Cancelled``: it propagates out of
    ``trainer.train()`` at the end of the current optimizer step.
    """

    def __init__(self, progress: ProgressCallback, stage: str) -> None:
        from transformers import TrainerCallback

        reporter = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                reporter.report(state)

            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                reporter.report(state)

            def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
                if reporter.update(logs or {}, state.global_step):
                    reporter.report(state)

        self.callback = _Callback()
        self.progress = progress
        self.stage = stage
        self.metrics: dict[str, float] = {}
        self.loss_history: list[tuple[int, float]] = []
        self.eval_history: list[tuple[int, float]] = []

    def update(self, logs: dict[str, Any], step: int) -> bool:
        changed = False
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if isinstance(logs.get(key), int | float) and math.isfinite(logs[key]):
                self.metrics[key] = float(logs[key])
                changed = True
        if "loss" in logs:
            self.loss_history.append((step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.eval_history.append((step, float(logs["eval_loss"])))
        return changed

    def report(self, state: Any) -> None:
        self.progress(
            Progress(
                "training",
                state.global_step,
                state.max_steps,
                "steps",
                message=self.stage,
                metrics=dict(self.metrics),
            )
        )


def _training_arguments(**kwargs: Any) -> Any:
    """TrainingArguments, with the argument names of the installed transformers."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    if "activation_checkpointing" not in names:
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
        kwargs["gradient_checkpointing_kwargs"] = kwargs.pop("activation_checkpointing_kwargs")
    if "include_num_input_tokens_seen" in names:  # a bool before transformers 5, "all" since
        counting = TrainingArguments.include_num_input_tokens_seen
        kwargs["include_num_input_tokens_seen"] = "all" if isinstance(counting, str) else True
    return TrainingArguments(**kwargs)


@dataclass
class StageSettings:
    name: str  # cpt | lora | kd
    learning_rate: float
    warmup_steps: int
    scheduler: str
    max_steps: int | None  # None: epochs decide
    epochs: float
    length: int  # cutoff_len (LoRA) or packed seq_len (CPT)
    weight_decay: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    packed: bool = False  # fixed-length blocks (CPT, KD) rather than padded examples (LoRA)


def _prepare_checkpoint_dir(stage_dir: Path | None, spec: RetrainSpec, resume: bool) -> str | None:
    """The last checkpoint to resume from, or None. A directory holding another spec's run is
    refused (resume) or cleared (no resume)."""
    if stage_dir is None:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    marker = stage_dir / "retrain_spec.json"
    wanted = spec.model_dump(mode="json")
    if resume and marker.is_file() and json.loads(marker.read_text()) != wanted:
        raise RetrainError(
            f"checkpoint directory {str(stage_dir)!r} holds checkpoints of a different retrain spec; "
            "resume with the same spec, or start over (resume=False)"
        )
    if is_main_process():
        if stage_dir.is_dir() and not resume:
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(wanted, indent=2))
    return get_last_checkpoint(str(stage_dir)) if resume and stage_dir.is_dir() else None


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a plain single process): the one that
    writes outputs; Trainer itself already saves checkpoints from rank 0 only."""
    return int(os.environ.get("RANK", "0")) == 0


def train_stage(
    model: Any,
    tokenizer: Any,
    data: StageData,
    settings: StageSettings,
    spec: RetrainSpec,
    precision: Precision,
    device: torch.device,
    *,
    stage_dir: Path | None,
    resume: bool,
    progress: ProgressCallback,
    distill: Distillation | None = None,
) -> dict[str, Any]:
    """Run Trainer on one stage (with ``distill``: against its teacher); return the stage's
    report entry."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, default_data_collator

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = max(1, spec.batch_size // (spec.micro_batch_size * world_size))
    gradient_checkpointing = (
        spec.gradient_checkpointing
        if spec.gradient_checkpointing is not None
        else device.type == "cuda"
    )
    resume_from = _prepare_checkpoint_dir(stage_dir, spec, resume)
    scratch = (
        None
        if stage_dir is not None
        else Path(tempfile.mkdtemp(prefix=f"shortened-{settings.name}-"))
    )
    run_dir = stage_dir or scratch
    assert run_dir is not None

    if settings.packed:
        collator = default_data_collator
    else:
        collator = DataCollatorForSeq2Seq(
            tokenizer,
            padding=True,
            pad_to_multiple_of=8,
            label_pad_token_id=IGNORE_INDEX,
            return_tensors="pt",
        )
    args = _training_arguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=spec.micro_batch_size,
        per_device_eval_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        optim="adamw_torch",
        logging_steps=spec.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if data.eval is not None else "no",
        eval_on_start=data.eval is not None,  # the validation loss before training, for the report
        eval_steps=spec.eval_steps or spec.save_steps,
        save_strategy="steps" if stage_dir is not None else "no",
        save_steps=spec.save_steps,
        save_total_limit=spec.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=device.type == "cpu",
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}
        if gradient_checkpointing
        else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Evaluation needs the loss only; without this Trainer also gathers every logit.
        prediction_loss_only=distill is not None,
    )
    reporter = ProgressReporter(progress, settings.name)
    trainer_kwargs: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": data.train,
        "eval_dataset": data.eval,
        "data_collator": collator,
        "callbacks": [reporter.callback],
    }
    trainer: Trainer
    if distill is not None:
        from .distillation import DistillationTrainer

        trainer = DistillationTrainer(
            **trainer_kwargs, teacher=distill.teacher, kd_loss=distill.loss
        )
    else:
        trainer = Trainer(**trainer_kwargs)
    trainer.remove_callback(PrinterCallback)  # progress goes through the callback, not stdout
    model.config.use_cache = False
    clock = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=resume_from)
        eval_loss = None
        if data.eval is not None:
            eval_loss = float(trainer.evaluate()["eval_loss"])
            reporter.metrics["eval_loss"] = eval_loss
            reporter.report(trainer.state)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    model.config.use_cache = True
    state = trainer.state
    return {
        "stage": settings.name,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": round(float(state.epoch or 0.0), 4),
        "resumed_from_step": int(Path(resume_from).name.rsplit("-", 1)[-1])
        if resume_from
        else None,
        "learning_rate": settings.learning_rate,
        "lr_scheduler": settings.scheduler,
        "warmup_steps": settings.warmup_steps,
        "weight_decay": settings.weight_decay,
        "micro_batch_size": spec.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "world_size": world_size,
        "effective_batch_size": spec.micro_batch_size * accumulation * world_size,
        "gradient_checkpointing": gradient_checkpointing,
        "data_format": data.format,
        "train_records": data.train_records,
        "train_items": data.train_items,
        "eval_records": data.eval_records,
        "eval_items": data.eval_items,
        "dropped_examples": data.dropped_examples,
        "tokens_seen": getattr(state, "num_input_tokens_seen", None) or None,
        "train_loss_mean": float(output.training_loss),
        "train_loss_last": reporter.loss_history[-1][1] if reporter.loss_history else None,
        "eval_loss_start": reporter.eval_history[0][1] if reporter.eval_history else None,
        "eval_loss": eval_loss,
        "loss_history": reporter.loss_history,
        "eval_loss_history": reporter.eval_history,
        "runtime_s": round(time.perf_counter() - clock, 3),
        **settings.extra,
    }


def _lora_targets(model: torch.nn.Module, wanted: list[str]) -> tuple[list[str], list[str]]:
    linear_names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    found = [t for t in wanted if t in linear_names]
    if not found:
        raise RetrainError(
            f"none of the LoRA target modules {wanted} is a linear layer of this model; "
            f"its linear layers are named {sorted(linear_names)}"
        )
    return found, [t for t in wanted if t not in linear_names]


def _training_tokenizer(tokenizer: Any) -> Any:
    """A copy with a pad token (UNK, else EOS, as the paper's code) and right padding; the
    saved tokenizer stays as loaded."""
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (
            tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        )
    tokenizer.padding_side = "right"
    return tokenizer


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


@dataclass
class Distillation:
    """The frozen teacher of a KD stage and the loss's settings."""

    teacher: Any
    loss: KdLoss


@dataclass
class RetrainRun:
    """What the stages of one retrain share: the loaded model, where stage checkpoints go, and
    what the stages produced so far."""

    spec: RetrainSpec
    loaded: LoadedModel
    model: Any  # the model trained: the loaded one, or the finished CPT stage's on resume
    train_tokenizer: Any
    device: torch.device
    precision: Precision
    params_before: int
    checkpoint_root: Path | None
    resume: bool
    cpt_already_done: bool  # cpt_lora resumed after its CPT stage finished
    stages: list[dict[str, Any]] = field(default_factory=list)
    trainable: dict[str, int] = field(default_factory=dict)
    peft_model: Any = None
    scratch_cpt: Path | None = None  # the CPT model of a cpt_lora run without checkpoint_dir

    @property
    def cpt_done_dir(self) -> Path | None:
        return _cpt_done_dir(self.checkpoint_root)

    def stage_dir(self, name: str) -> Path | None:
        return self.checkpoint_root / name if self.checkpoint_root else None


def retrain_model(
    spec: RetrainSpec,
    output_dir: Path,
    *,
    progress: ProgressCallback = no_progress,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Retrain ``spec.model`` with LoRA, CPT, CPT+LoRA or KD and save the result to ``output_dir``.

    Outputs: the full model (LoRA: merged with ``merge_and_unload``) as a Hugging Face
    checkpoint with its tokenizer; for LoRA (and KD with ``kd.lora``) also ``adapter/`` (peft
    ``save_pretrained``); for
    cpt_lora also ``cpt/`` (the CPT model, the adapter's base); and ``report.json``.

    Trainer checkpoints go to ``checkpoint_dir/<stage>/checkpoint-N`` every ``save_steps``;
    with ``resume`` a restarted run continues from the last one (no ``checkpoint_dir``: no
    checkpoints). Progress is reported per optimizer step with the latest ``loss`` and
    ``eval_loss``; the callback may raise ``Cancelled`` to stop within one step, and then
    nothing is written to ``output_dir``.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir)  # fail before loading anything
    timer = PhaseTimer()
    run = load_for_retraining(
        spec, checkpoint_dir, resume, progress=progress, store=store, cache_dir=cache_dir
    )
    timer("load_s")
    try:
        if spec.method in ("cpt", "cpt_lora"):
            run_cpt_stage(run, progress=progress, store=store, cache_dir=cache_dir, timer=timer)
        if spec.method in ("lora", "cpt_lora"):
            run_lora_stage(run, progress=progress, store=store, cache_dir=cache_dir, timer=timer)
        if spec.method == "kd":
            run_kd_stage(run, progress=progress, store=store, cache_dir=cache_dir, timer=timer)
        progress(Progress("saving", message=str(output_dir)))
        report = retrain_report(run, timer)
        if not is_main_process():
            return report  # rank 0 writes the outputs
        write_outputs(run, report, output_dir, timer)
    finally:
        if run.scratch_cpt is not None:
            shutil.rmtree(run.scratch_cpt, ignore_errors=True)
    log.info(
        "retrained %s with %s: %d steps, final loss %s",
        spec.model,
        spec.method,
        report["steps"],
        report["final_train_loss"],
    )
    return report


def _cpt_done_dir(checkpoint_root: Path | None) -> Path | None:
    """Where a cpt_lora run keeps its finished CPT model (what a resumed run's LoRA stage
    starts from)."""
    return checkpoint_root / "cpt" / "final" if checkpoint_root is not None else None


def load_for_retraining(
    spec: RetrainSpec,
    checkpoint_dir: Path | None,
    resume: bool,
    *,
    progress: ProgressCallback,
    store: ArtifactStore | None,
    cache_dir: Path | None,
) -> RetrainRun:
    """Device, precision and seed; the model in its training precision (for a cpt_lora run
    resumed after its CPT stage: the saved CPT model)."""
    from transformers import set_seed

    checkpoint_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    local_rank = os.environ.get("LOCAL_RANK")
    device = pick_device(
        f"cuda:{local_rank}"
        if spec.device == "auto" and local_rank is not None and torch.cuda.is_available()
        else spec.device
    )
    adapter_only = spec.method == "lora" or (spec.kd is not None and spec.kd.lora)
    precision = choose_precision("lora" if adapter_only else spec.method, spec.dtype, device)
    weights_dtype = str(precision.weights).removeprefix("torch.")
    set_seed(spec.seed)

    cpt_done_dir = _cpt_done_dir(checkpoint_root)
    cpt_already_done = bool(
        spec.method == "cpt_lora"
        and resume
        and cpt_done_dir is not None
        and (cpt_done_dir / "stage_report.json").is_file()
    )
    progress(Progress("loading", message=spec.model))
    loaded = load_model(
        spec.model, dtype=weights_dtype, device=str(device), store=store, cache_dir=cache_dir
    )
    model = loaded.model
    if cpt_already_done:
        assert cpt_done_dir is not None
        model = load_model(str(cpt_done_dir), dtype=weights_dtype, device=str(device)).model
    return RetrainRun(
        spec,
        loaded,
        model,
        _training_tokenizer(loaded.tokenizer),
        device,
        precision,
        count_parameters(loaded.model),
        checkpoint_root,
        resume,
        cpt_already_done,
    )


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
    settings = StageSettings(
        "cpt",
        spec.cpt.learning_rate,
        spec.cpt.warmup_steps,
        "cosine",
        _packed_max_steps(spec, spec.cpt, seq_len),
        1.0,
        seq_len,
        weight_decay=spec.cpt.weight_decay,
        extra={"seq_len": seq_len, "max_tokens": spec.cpt.max_tokens},
        packed=True,
    )
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
    lora_info = _wrap_lora(run)
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


def _wrap_lora(run: RetrainRun) -> dict[str, Any]:
    """Wrap the run's model in a peft LoRA adapter (the spec's ``lora`` section); return the
    adapter's settings for the report."""
    from peft import LoraConfig, get_peft_model

    spec = run.spec
    targets, missing = _lora_targets(run.model, spec.lora.target_modules)
    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft probes a deprecated transformers attribute; not the user's concern.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        run.peft_model = get_peft_model(run.model, config)
    return {
        "r": spec.lora.r,
        "alpha": spec.lora.alpha,
        "dropout": spec.lora.dropout,
        "target_modules": targets,
        "missing_target_modules": missing,
    }


def run_kd_stage(
    run: RetrainRun,
    *,
    progress: ProgressCallback,
    store: ArtifactStore | None,
    cache_dir: Path | None,
    timer: PhaseTimer,
) -> None:
    """Distillation from the teacher on packed raw text: every weight, or a LoRA adapter."""
    from .distillation import KdLoss, check_same_vocabulary, load_teacher

    spec = run.spec
    kd = spec.kd
    assert kd is not None and kd.teacher is not None
    progress(Progress("loading", message=f"teacher {kd.teacher}"))
    teacher = load_model(
        kd.teacher,
        dtype=str(run.precision.weights).removeprefix("torch."),
        device=str(run.device),
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
        "seq_len": seq_len,
        "max_tokens": kd.max_tokens,
        "teacher": kd.teacher,
        "alpha": kd.alpha,
        "temperature": kd.temperature,
        "chunk_size": kd.chunk_size,
    }
    if kd.lora:
        extra["lora"] = _wrap_lora(run)
        model = run.peft_model
    else:
        model = run.model
        model.train()
        model.requires_grad_(True)
    settings = StageSettings(
        "kd",
        kd.learning_rate,
        kd.warmup_steps,
        "cosine",
        _packed_max_steps(spec, kd, seq_len),
        1.0,
        seq_len,
        weight_decay=kd.weight_decay,
        extra=extra,
        packed=True,
    )
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
    stage["trainable_params"] = run.trainable[settings.name]
    run.stages.append(stage)
    timer(f"{settings.name}_train_s")
    return stage


def retrain_report(run: RetrainRun, timer: PhaseTimer) -> dict[str, Any]:
    spec, stages = run.spec, run.stages
    return {
        "model": spec.model,
        "model_commit": run.loaded.resolved.commit,
        "method": spec.method,
        "architecture": run.loaded.adapter.name,
        "model_type": run.model.config.model_type,
        "num_layers": run.loaded.adapter.num_layers(run.model),
        "hyperparameters": spec.model_dump(mode="json"),
        "stages": stages,
        "steps": sum(s["steps"] for s in stages),
        "final_train_loss": stages[-1]["train_loss_last"],
        "final_eval_loss": stages[-1]["eval_loss"],
        "params": run.params_before,
        "trainable_params": run.trainable,
        "precision": run.precision.label,
        "device": str(run.device),
        "outputs": {"model": "."},
        "versions": _versions(),
        "timings": timer.timings,
    }


def write_outputs(
    run: RetrainRun, report: dict[str, Any], output_dir: Path, timer: PhaseTimer
) -> None:
    """The model (LoRA: merged, unless ``merge`` is off), ``adapter/``, for cpt_lora ``cpt/``,
    and report.json, all appearing at ``output_dir`` at once."""
    spec, loaded = run.spec, run.loaded
    with atomic_output_dir(output_dir) as staging:
        model = run.model
        if run.peft_model is not None:
            _write_adapter(run, report, staging, output_dir)
            if spec.lora.merge:
                model = run.peft_model.merge_and_unload()
        if run.peft_model is None or spec.lora.merge:
            save_model(
                model,
                loaded.tokenizer,
                staging,
                loaded.source_dtype,
                max_shard_size=spec.max_shard_size or loaded.source_shard_size,
            )
            report["params"] = count_parameters(model)
        else:
            report["outputs"].pop("model")
        timer("saving_s")
        timer.timings["total_s"] = timer.total()
        report["timings"] = timer.timings
        (staging / "report.json").write_text(json.dumps(report, indent=2))


def _write_adapter(
    run: RetrainRun, report: dict[str, Any], staging: Path, output_dir: Path
) -> None:
    """``adapter/`` pointing at its base, and for cpt_lora that base (the CPT model) as ``cpt/``."""
    spec = run.spec
    adapter_base = (
        str(output_dir.resolve() / "cpt")
        if spec.method == "cpt_lora"
        else run.loaded.resolved.hub_id or run.loaded.resolved.path_or_id
    )
    run.peft_model.save_pretrained(str(staging / "adapter"))
    _set_adapter_base(staging / "adapter", adapter_base)
    run.loaded.tokenizer.save_pretrained(staging / "adapter")
    report["outputs"]["adapter"] = "adapter"
    report["adapter_base"] = adapter_base
    if spec.method == "cpt_lora":
        done_dir = run.cpt_done_dir
        cpt_saved = done_dir if done_dir is not None and done_dir.is_dir() else run.scratch_cpt
        assert cpt_saved is not None
        shutil.copytree(
            cpt_saved,
            staging / "cpt",
            ignore=shutil.ignore_patterns("stage_report.json"),
        )
        report["outputs"]["cpt_model"] = "cpt"


def _set_adapter_base(adapter_dir: Path, base: str) -> None:
    """Point adapter_config.json at the model the adapter was trained on (for cpt_lora: the
    ``cpt/`` model next to it, not the pruned model the run started from)."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _versions() -> dict[str, str]:
    import accelerate
    import peft

    return {**library_versions(), "peft": peft.__version__, "accelerate": accelerate.__version__}
