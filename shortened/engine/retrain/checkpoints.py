"""Where a retrain run's stages keep their Trainer checkpoints, and which process writes: the
checkpoint directory of a stage (resumed from, refused or cleared against the spec it holds),
the finished CPT model a resumed cpt_lora run starts its LoRA stage from, and rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from shortened.specs import RetrainSpec

from ..errors import RetrainError


def prepare_checkpoint_dir(stage_dir: Path | None, spec: RetrainSpec, resume: bool) -> str | None:
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


def finished_cpt_dir(checkpoint_root: Path | None) -> Path | None:
    """Where a cpt_lora run keeps its finished CPT model (what a resumed run's LoRA stage
    starts from)."""
    return checkpoint_root / "cpt" / "final" if checkpoint_root is not None else None
