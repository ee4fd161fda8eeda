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

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortened.specs import RetrainSpec

from ..outputs import PhaseTimer, check_output_dir
from ..progress import Progress, ProgressCallback, no_progress
from .artifacts import retrain_report, write_outputs
from .checkpoints import is_main_process
from .run import load_for_retraining
from .stages import run_cpt_stage, run_kd_stage, run_lora_stage

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

log = logging.getLogger(__name__)


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
