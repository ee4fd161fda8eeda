"""What the stages of one retrain run share (``RetrainRun``) and how a run starts: device,
precision and seed, the model loaded in its training precision (for a resumed cpt_lora run,
the saved CPT model), and a training copy of the tokenizer.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import RetrainSpec

from ..models import LoadedModel, count_parameters, load_model, pick_device
from ..progress import Progress, ProgressCallback
from ..quality_gate import Gate
from .checkpoints import finished_cpt_dir, is_sharded
from .precision import Precision, choose_precision

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore


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
    # The quality gate's parent measurement, taken before the first stage trains, and the
    # items it was measured on (the trained model is measured on the same ones).
    gate: Gate | None = None
    gate_items: list[dict[str, Any]] = field(default_factory=list)

    @property
    def load_device(self) -> torch.device:
        """Where models are loaded: the training device, but the CPU for an FSDP rank (the
        Trainer moves each rank's shard to its device; a whole copy per device may not fit)."""
        return torch.device("cpu") if is_sharded(self.spec) else self.device

    @property
    def cpt_done_dir(self) -> Path | None:
        return finished_cpt_dir(self.checkpoint_root)

    def stage_dir(self, name: str) -> Path | None:
        return self.checkpoint_root / name if self.checkpoint_root else None


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

    cpt_done_dir = finished_cpt_dir(checkpoint_root)
    cpt_already_done = bool(
        spec.method == "cpt_lora"
        and resume
        and cpt_done_dir is not None
        and (cpt_done_dir / "stage_report.json").is_file()
    )
    progress(Progress("loading", message=spec.model))
    load_device = "cpu" if is_sharded(spec) else str(device)  # as RetrainRun.load_device
    loaded = load_model(
        spec.model, dtype=weights_dtype, device=load_device, store=store, cache_dir=cache_dir
    )
    model = loaded.model
    if cpt_already_done:
        assert cpt_done_dir is not None
        model = load_model(str(cpt_done_dir), dtype=weights_dtype, device=load_device).model
    return RetrainRun(
        spec,
        loaded,
        model,
        training_tokenizer(loaded.tokenizer),
        device,
        precision,
        count_parameters(loaded.model),
        checkpoint_root,
        resume,
        cpt_already_done,
    )


def training_tokenizer(tokenizer: Any) -> Any:
    """A copy with a pad token (UNK, else EOS, as the paper's code) and right padding; the
    saved tokenizer stays as loaded."""
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (
            tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        )
    tokenizer.padding_side = "right"
    return tokenizer
