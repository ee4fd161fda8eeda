"""One training stage on transformers' ``Trainer``: its arguments (batch, accumulation,
schedule, checkpoints, precision), the collator, the callbacks that report progress per
optimizer step and stop the stage at its first non-finite loss or weight (``finite.py``), and
the stage's report entry. With a teacher, the Trainer is the KD one of
``distillation.py``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import RetrainSpec

from ..finite import non_finite_guard
from ..progress import Progress, ProgressCallback
from ..retrain_data import IGNORE_INDEX, StageData
from .checkpoints import prepare_checkpoint_dir
from .parallel import parallel_arguments, prepare_parallel
from .precision import Precision

if TYPE_CHECKING:
    from ..distillation import KdLoss


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


def training_arguments(**kwargs: Any) -> Any:
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
    """One stage's schedule and optimizer settings, and what its report entry adds."""

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


@dataclass
class Distillation:
    """The frozen teacher of a KD stage and the loss's settings."""

    teacher: Any
    loss: KdLoss


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
    resume_from = prepare_checkpoint_dir(stage_dir, spec, resume)
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
    args = training_arguments(
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
        # A non-finite loss is logged as is (not replaced by the running mean), so the guard
        # sees it and the report never shows a diverged stage as a finite one.
        logging_nan_inf_filter=False,
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
        **parallel_arguments(spec, model, device),  # FSDP2 or DDP under torchrun
    )
    reporter = ProgressReporter(progress, settings.name)
    trainer_kwargs: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": data.train,
        "eval_dataset": data.eval,
        "data_collator": collator,
        "callbacks": [reporter.callback, non_finite_guard(settings.name)],
    }
    trainer: Trainer
    if distill is not None:
        from ..distillation import DistillationTrainer

        trainer = DistillationTrainer(
            **trainer_kwargs, teacher=distill.teacher, kd_loss=distill.loss
        )
    else:
        trainer = Trainer(**trainer_kwargs)
    trainer.remove_callback(PrinterCallback)  # progress goes through the callback, not stdout
    prepare_parallel(trainer, spec, distill.teacher if distill is not None else None)
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
