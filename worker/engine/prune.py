"""One-shot depth pruning: load, calibrate, score, remove blocks, save a checkpoint + report.

The output directory is written atomically: everything goes to a temporary sibling that is
renamed into place at the end, so a failure or cancellation never leaves a half-written
checkpoint that looks complete.
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.render import block_score_svg
from shortened.specs import PruneSpec

from .architectures import keep_blocks
from .calibration import SAMPLING_VERSIONS, calibration_draw, fingerprint
from .checkpoint import CHECKPOINT_NAME, ScoreCheckpoint, checkpoint_key
from .criteria import CRITERIA, CRITERION_VERSIONS, CriterionResult, ScoringContext
from .errors import NothingToPrune, OutputExists
from .models import count_parameters, load_model
from .progress import Progress, ProgressCallback, no_progress
from .score_cache import (
    CACHE_VERSION,
    ORDER_FROM_SCORES,
    PER_SCOPE,
    ScoreCache,
    cache_key,
    model_fingerprint,
)

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

log = logging.getLogger(__name__)


def removable_blocks(num_layers: int, protect_first: int, protect_last: int) -> list[int]:
    """Original indices that may be removed: all but the first and last protected blocks."""
    return list(range(min(protect_first, num_layers), max(num_layers - protect_last, 0)))


def blocks_for_ratio(
    total_params: int, block_params: Sequence[int], ratio: float, max_blocks: int
) -> int:
    """The block count whose removal brings the removed-parameter fraction closest to ``ratio``."""
    mean_block = sum(block_params) / len(block_params)
    return min(
        range(1, max_blocks + 1), key=lambda k: (abs(k * mean_block / total_params - ratio), k)
    )


def check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise OutputExists(f"output directory {str(output_dir)!r} exists and is not empty")


@contextmanager
def atomic_output_dir(output_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``output_dir``; move it into place only on success."""
    check_output_dir(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        check_output_dir(output_dir)
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def library_versions() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def write_scores_csv(path: Path, report: dict[str, Any]) -> None:
    removed = set(report["removed_blocks"])
    protected = set(report["protected_blocks"])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["block", "score", "removed", "protected", "removal_rank"])
        rank = {block: i for i, block in enumerate(report["removal_order"])}
        for block, score in enumerate(report["block_scores"]):
            writer.writerow(
                [
                    block,
                    "" if score is None else f"{score:.8g}",
                    int(block in removed),
                    int(block in protected),
                    rank.get(block, ""),
                ]
            )


def prune_model(
    spec: PruneSpec,
    output_dir: Path,
    *,
    progress: ProgressCallback = no_progress,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
    resume_dir: Path | None = None,
    score_cache: ScoreCache | None = None,
) -> dict[str, Any]:
    """Depth-prune ``spec.model`` and save the result to ``output_dir``.

    Writes a Hugging Face checkpoint (safetensors + tokenizer), ``report.json`` and
    ``block_scores.csv``; returns the report. Raises an ``EngineError`` subclass for bad
    input; the progress callback may raise ``Cancelled`` to stop between blocks.

    ``resume_dir``: the perplexity criteria save every block score there as it is computed
    (keyed by model, calibration fingerprint and criterion) and a later call with the same
    directory skips the blocks already scored; ``report["resumed_scores"]`` counts them.

    ``score_cache``: block scores are looked up by model content, criterion and calibration
    (see ``score_cache.py``) and saved after scoring, so a grid over block counts or
    protection scores once; ``report["score_cache"]`` says what was reused and computed.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir)  # fail before loading anything
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    progress(Progress("loading", message=spec.model))
    loaded = load_model(
        spec.model, dtype=spec.dtype, device=spec.device, store=store, cache_dir=cache_dir
    )
    model, adapter = loaded.model, loaded.adapter
    num_layers = adapter.num_layers(model)
    params_before = count_parameters(model)
    block_params = [count_parameters(block) for block in adapter.layers(model)]
    candidates = removable_blocks(num_layers, spec.protect_first, spec.protect_last)
    protected = [b for b in range(num_layers) if b not in candidates]
    if spec.num_blocks is not None:
        num_blocks = spec.num_blocks
    else:
        assert spec.target_ratio is not None
        if not candidates:
            num_blocks = 0
        else:
            num_blocks = blocks_for_ratio(
                params_before, block_params, spec.target_ratio, len(candidates)
            )
    if not candidates or num_blocks > len(candidates):
        raise NothingToPrune(
            f"asked to remove {num_blocks} of {num_layers} blocks but only {len(candidates)} are removable "
            f"(protect_first={spec.protect_first}, protect_last={spec.protect_last})"
        )
    phase("load_s")

    calibration_report: dict[str, Any] | None = None
    if spec.calibration is not None:
        progress(
            Progress(
                "calibration", message=str(spec.calibration.source or spec.calibration.dataset)
            )
        )
        draw = calibration_draw(
            spec.calibration, loaded.tokenizer, store=store, cache_dir=cache_dir
        )
        windows = draw.tokens
        calibration_fp = fingerprint(windows)
        sampling = SAMPLING_VERSIONS[draw.sampling]
        calibration_report = {
            **spec.calibration.model_dump(),
            **draw.record(),
            "windows": list(windows.shape),
            "fingerprint": calibration_fp,
        }
        phase("calibration_s")
    else:  # a data-free criterion (magnitude) without calibration data
        windows = torch.empty((0, 0), dtype=torch.long)
        calibration_fp = sampling = "none"
    criterion_version = CRITERION_VERSIONS[spec.criterion]
    checkpoint = None
    if resume_dir is not None:
        key = checkpoint_key(
            model=spec.model, criterion=spec.criterion, criterion_version=criterion_version, calibration=calibration_fp,
            sampling=sampling, num_layers=num_layers, candidates=candidates, num_blocks=num_blocks,
            dtype=str(loaded.dtype), device=loaded.device.type,
        )  # fmt: skip
        checkpoint = ScoreCheckpoint(Path(resume_dir) / CHECKPOINT_NAME, key)
    resumed = checkpoint.resumed if checkpoint else 0
    cache_info: dict[str, Any] | None = None
    cache_key_ = None
    if score_cache is not None:
        model_fp = model_fingerprint(
            loaded.resolved.path_or_id, loaded.resolved.revision, model.config,
            memo_path=Path(cache_dir) / "fingerprints.json" if cache_dir else None,
        )  # fmt: skip
        cache_key_ = cache_key(
            model=model_fp, criterion=spec.criterion, criterion_version=criterion_version, calibration=calibration_fp,
            sampling=sampling, dtype=str(loaded.dtype), device_type=loaded.device.type, num_layers=num_layers,
            candidates=candidates, num_blocks=num_blocks,
        )  # fmt: skip
        cache_info = {
            "key": cache_key_,
            "model_fingerprint": model_fp,
            "location": score_cache.location(cache_key_),
        }
        phase("fingerprint_s")

    def waiting() -> None:
        progress(
            Progress(
                "scoring",
                0,
                0,
                "blocks",
                message="waiting for another job scoring the same model, criterion and calibration",
            )
        )

    lock = (
        score_cache.lock(cache_key_, waiting)
        if score_cache is not None and cache_key_
        else nullcontext()
    )
    with lock:
        cached = score_cache.load(cache_key_) if score_cache is not None and cache_key_ else None
        result = None
        reused = 0
        if spec.criterion in PER_SCOPE:
            if cached is not None:
                checkpoint = checkpoint or ScoreCheckpoint(None, "score-cache")
                reused = checkpoint.merge(cached.get("scopes", {}))
            elif score_cache is not None and checkpoint is None:
                checkpoint = ScoreCheckpoint(None, "score-cache")  # collects scores to cache
        elif cached is not None and "block_scores" in cached:
            scores = cached["block_scores"]
            order = (
                sorted(candidates, key=lambda b: (scores[b], b))
                if spec.criterion in ORDER_FROM_SCORES
                else cached["removal_order"]
            )
            result = CriterionResult(scores, order, cached.get("details", {}))
            reused = sum(score is not None for score in scores)
        message: str = spec.criterion
        if reused:
            message = f"{spec.criterion} (reusing {reused} cached block scores)"
        elif resumed:
            message = f"{spec.criterion} (resuming {resumed} saved block scores)"
        progress(Progress("scoring", 0, 0, "blocks", message=message))
        if result is None:
            context = ScoringContext(
                model, adapter, windows, candidates, num_blocks, spec.batch_size, progress,
                gradient_batch_size=spec.taylor_batch_size, score_all_blocks=spec.score_all_blocks, checkpoint=checkpoint,
            )  # fmt: skip
            result = CRITERIA[spec.criterion](context)
            if score_cache is not None and cache_key_:
                entry: dict[str, Any] = {
                    "version": CACHE_VERSION,
                    "criterion": spec.criterion,
                    "model_fingerprint": cache_info and cache_info["model_fingerprint"],
                }
                if spec.criterion in PER_SCOPE and checkpoint is not None:
                    entry["scopes"] = checkpoint.scopes
                else:
                    entry.update(
                        block_scores=result.block_scores,
                        removal_order=result.removal_order,
                        details=result.details,
                    )
                try:
                    score_cache.save(cache_key_, entry)
                except Exception as exc:  # the scores are still good for this run
                    log.warning("could not save block scores to the cache: %s", exc)
    if cache_info is not None:
        computed = sum(score is not None for score in result.block_scores) - reused
        cache_info.update(reused_scores=reused, computed_scores=max(computed, 0), hit=reused > 0)
    phase("scoring_s")

    progress(Progress("pruning", message=f"removing {num_blocks} blocks"))
    removed = sorted(result.removal_order[:num_blocks])
    kept = [b for b in range(num_layers) if b not in removed]
    keep_blocks(model, kept)
    params_after = count_parameters(model)
    phase("pruning_s")

    report: dict[str, Any] = {
        "model": spec.model,
        "architecture": adapter.name,
        "model_type": model.config.model_type,
        "criterion": spec.criterion,
        "criterion_version": criterion_version,
        "block_scores": result.block_scores,
        "score_meaning": "lower = less important (removed first)",
        "removal_order": result.removal_order,
        "removed_blocks": removed,
        "kept_blocks": kept,
        "protected_blocks": protected,
        "num_layers_before": num_layers,
        "num_layers_after": len(kept),
        "num_blocks_removed": num_blocks,
        "target_ratio": spec.target_ratio,
        "params_before": params_before,
        "params_after": params_after,
        "params_removed_ratio": round(1 - params_after / params_before, 6),
        "criterion_details": result.details,
        "resumed_scores": resumed,
        # Block scores taken from the score cache instead of computed (0: none).
        "scores_reused": cache_info["reused_scores"] if cache_info else 0,
        "score_cache": cache_info,
        # What was drawn: sampling name and version, seed, document indices and window starts,
        # so a run can be reproduced and compared with the paper's code (None: no data used).
        "calibration": calibration_report,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "versions": library_versions(),
        "timings": timings,
    }

    progress(Progress("saving", message=str(output_dir)))
    with atomic_output_dir(output_dir) as staging:
        if loaded.source_dtype is not None and loaded.source_dtype != loaded.dtype:
            model.to(loaded.source_dtype)  # save in the checkpoint's own precision
        model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        phase("saving_s")
        report["timings"] = timings
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        write_scores_csv(staging / "block_scores.csv", report)
        (staging / "block_scores.svg").write_text(block_score_svg(report))
    log.info(
        "pruned %s: removed %s, %d -> %d params", spec.model, removed, params_before, params_after
    )
    return report
