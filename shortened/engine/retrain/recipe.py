"""Retraining a pruned model: LoRA, continued pretraining (CPT), CPT followed by LoRA, or
knowledge distillation from the unpruned parent (KD; the loss is in ``distillation.py``).

One readable recipe per stage, built on transformers' ``Trainer`` (so multi-GPU runs work
through accelerate/torchrun, and checkpoints/resume are Trainer's own):

    data (records -> tokenized examples or packed blocks, held-out split; ``retrain_data.py``)
      -> model (full parameters for CPT and KD, a peft LoRA wrapper for LoRA and KD with lora)
      -> Trainer (AdamW, warm-up + linear (LoRA) / cosine (CPT, KD) schedule, checkpoints;
         for KD a Trainer whose loss compares the student with the frozen teacher)
      -> checks (no NaN or infinity in losses or weights, ``finite.py``; held-out perplexity
         within the quality gate's ratio of the untrained model's, ``quality_gate.py``)
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

from ..finite import check_finite, check_finite_weights
from ..outputs import PhaseTimer, check_output_dir
from ..progress import Progress, ProgressCallback, no_progress
from ..quality_gate import gate_fields, items_perplexity, judge, unmeasured
from .artifacts import retrain_report, write_outputs
from .checkpoints import is_main_process, world_size
from .launch import process_count, run_distributed
from .parallel import share_cpt_model
from .run import RetrainRun, load_for_retraining
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

    With ``distributed.nproc_per_node`` above one, the training runs in that many processes
    under torchrun (``launch.py``; FSDP2 or DDP), and this process follows them: progress,
    cancellation and errors as above.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir)  # fail before loading anything
    processes = process_count(spec)
    if processes > 1 and world_size() == 1:
        return run_distributed(
            spec,
            output_dir,
            processes,
            progress=progress,
            store=store,
            cache_dir=cache_dir,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
        )
    return train_here(
        spec,
        output_dir,
        progress=progress,
        store=store,
        cache_dir=cache_dir,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )


def train_here(
    spec: RetrainSpec,
    output_dir: Path,
    *,
    progress: ProgressCallback = no_progress,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """The run in this process: all of it, or under torchrun this rank's part (every rank
    trains; rank 0 gates and writes the outputs)."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    timer = PhaseTimer()
    run = load_for_retraining(
        spec, checkpoint_dir, resume, progress=progress, store=store, cache_dir=cache_dir
    )
    timer("load_s")
    try:
        if spec.method in ("cpt", "cpt_lora"):
            run_cpt_stage(run, progress=progress, store=store, cache_dir=cache_dir, timer=timer)
        if spec.method == "cpt_lora":
            share_cpt_model(run)
        if spec.method in ("lora", "cpt_lora"):
            run_lora_stage(run, progress=progress, store=store, cache_dir=cache_dir, timer=timer)
        if spec.method == "kd":
            run_kd_stage(run, progress=progress, store=store, cache_dir=cache_dir, timer=timer)
        report = retrain_report(run, timer)
        if not is_main_process():
            return report  # rank 0 holds the gathered model: it gates and writes the outputs
        check_finite(report["stages"], "the training report")
        report.update(gate_fields(_judge(run)))
        check_finite_weights(run.model, "in the retrained model")
        progress(Progress("saving", message=str(output_dir)))
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


def _judge(run: RetrainRun) -> dict[str, Any]:
    """The quality gate's verdict on the trained model (adapters included), measured on the
    items its parent was."""
    if run.gate is None:
        return unmeasured(run.spec.quality_gate, "turned off (max_ppl_ratio null)")
    items = run.gate_items
    return judge(run.gate, lambda: items_perplexity(run.model, items), "retrained model")
