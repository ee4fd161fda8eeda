"""Retraining a pruned model (LoRA, CPT, CPT followed by LoRA, KD from the parent), one concern
a module: ``recipe`` (``retrain_model``, the steps in order), ``run`` (what the stages share and
how a run starts), ``stages`` (each method's stage), ``trainer`` (one stage on transformers'
``Trainer``), ``lora``, ``precision``, ``checkpoints`` (resume, rank 0) and ``artifacts`` (the
output directory and report); over several processes, ``launch`` (torchrun started and
followed), ``rank_main`` (one rank) and ``parallel`` (FSDP2/DDP for a stage). This package
re-exports their public names.
"""

from __future__ import annotations

from .artifacts import retrain_report, write_outputs
from .checkpoints import finished_cpt_dir, is_main_process, prepare_checkpoint_dir
from .lora import lora_targets, wrap_lora
from .precision import Precision, choose_precision
from .recipe import retrain_model
from .run import RetrainRun, load_for_retraining, training_tokenizer
from .stages import CPT_DEFAULT_SEQ_LEN, run_cpt_stage, run_kd_stage, run_lora_stage
from .trainer import (
    Distillation,
    ProgressReporter,
    StageSettings,
    train_stage,
    training_arguments,
)

__all__ = [
    "CPT_DEFAULT_SEQ_LEN",
    "Distillation",
    "Precision",
    "ProgressReporter",
    "RetrainRun",
    "StageSettings",
    "choose_precision",
    "finished_cpt_dir",
    "is_main_process",
    "load_for_retraining",
    "lora_targets",
    "prepare_checkpoint_dir",
    "retrain_model",
    "retrain_report",
    "run_cpt_stage",
    "run_kd_stage",
    "run_lora_stage",
    "train_stage",
    "training_arguments",
    "training_tokenizer",
    "wrap_lora",
    "write_outputs",
]
