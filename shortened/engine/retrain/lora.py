"""The LoRA adapter of a retrain run: the spec's target modules matched to the model's linear
layers, and the model wrapped in a peft adapter.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from shortened.specs import LORA_TARGET_MODULES

from ..errors import RetrainError
from .run import RetrainRun


def lora_targets(model: torch.nn.Module, wanted: list[str]) -> tuple[list[str], list[str]]:
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


def wrap_lora(run: RetrainRun) -> dict[str, Any]:
    """Wrap the run's model in a peft LoRA adapter (the spec's ``lora`` section); return the
    adapter's settings for the report."""
    from peft import LoraConfig, get_peft_model

    spec = run.spec
    wanted = list(spec.lora.target_modules)
    family_targets = run.loaded.adapter.lora_targets
    if family_targets is not None and wanted == list(LORA_TARGET_MODULES):
        wanted = list(family_targets)  # the default: this family's own projection names
    targets, missing = lora_targets(run.model, wanted)
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
