"""Where a retrain run's stages keep their Trainer checkpoints, and which process writes: the
checkpoint directory of a stage (resumed from its last complete checkpoint, refused or
cleared against the spec it holds),
the finished CPT model a resumed cpt_lora run starts its LoRA stage from, rank 0, and the
launch's world size.
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
    return last_complete_checkpoint(stage_dir) if resume and stage_dir.is_dir() else None


def last_complete_checkpoint(stage_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` that was written to the end: Trainer writes
    ``trainer_state.json`` last, after every rank's model and optimizer shards. A newer one
    without it was cut short (a process killed while saving); rank 0 removes it, so that the
    resumed run writes that step afresh."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = sorted(
        (int(path.name.rsplit("-", 1)[1]), path)
        for path in stage_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.is_dir() and path.name.rsplit("-", 1)[1].isdigit()
    )
    for _, path in reversed(steps):
        if (path / "trainer_state.json").is_file():
            return str(path)
        if is_main_process():
            shutil.rmtree(path, ignore_errors=True)
    return None


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a plain single process): the one that
    writes outputs; Trainer itself already saves checkpoints from rank 0 only."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """Ranks of this launch (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_sharded(spec: RetrainSpec) -> bool:
    """This rank trains an FSDP-sharded model (``parallel.py``)."""
    return world_size() > 1 and spec.distributed.strategy == "fsdp"


def finished_cpt_dir(checkpoint_root: Path | None) -> Path | None:
    """Where a cpt_lora run keeps its finished CPT model (what a resumed run's LoRA stage
    starts from)."""
    return checkpoint_root / "cpt" / "final" if checkpoint_root is not None else None
