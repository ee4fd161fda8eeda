"""Scoring the removable blocks with the spec's criterion, reusing what is already known:
scores a score cache holds for the same model, criterion and calibration (``score_cache.py``),
and scores a resumed run saved before it stopped (``checkpoint.py``). New scores go back to
the cache, under a per-key lock so that concurrent runs of one key score it once."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shortened.specs import PruneSpec

from .checkpoint import CHECKPOINT_NAME, ScoreCheckpoint, checkpoint_key
from .criteria import CRITERIA, CRITERION_VERSIONS, CriterionResult, ScoringContext
from .models import LoadedModel
from .outputs import PhaseTimer
from .progress import Progress, ProgressCallback
from .score_cache import (
    CACHE_VERSION,
    ORDER_FROM_SCORES,
    PER_SCOPE,
    ScoreCache,
    cache_key,
    model_fingerprint,
)

log = logging.getLogger(__name__)


@dataclass
class BlockScores:
    result: CriterionResult
    resumed: int  # scores loaded from the resume checkpoint
    cache_info: dict[str, Any] | None  # what the score cache reused and computed; None: no cache


@dataclass(frozen=True)
class Calibrated:
    """The calibration windows a run scores on, and what identifies them in keys and reports."""

    windows: torch.Tensor  # [n_samples, seq_len]; empty for a data-free criterion
    fingerprint: str  # of the token ids ("none" without data)
    sampling: str  # the sampling's version ("none" without data)
    report: dict[str, Any] | None  # report.json's "calibration" block


def score_blocks(
    spec: PruneSpec,
    loaded: LoadedModel,
    calibrated: Calibrated,
    candidates: list[int],
    num_blocks: int,
    *,
    progress: ProgressCallback,
    timer: PhaseTimer,
    cache_dir: Path | None,
    resume_dir: Path | None,
    score_cache: ScoreCache | None,
) -> BlockScores:
    """The criterion's scores and removal order for ``loaded``'s blocks; only the scores
    neither the cache nor the resume checkpoint holds are computed."""
    num_layers = loaded.adapter.num_layers(loaded.model)
    checkpoint = None
    if resume_dir is not None:
        key = checkpoint_key(
            model=spec.model,
            criterion=spec.criterion,
            criterion_version=CRITERION_VERSIONS[spec.criterion],
            calibration=calibrated.fingerprint,
            sampling=calibrated.sampling,
            num_layers=num_layers,
            candidates=candidates,
            num_blocks=num_blocks,
            dtype=str(loaded.dtype),
            device=loaded.device.type,
        )
        checkpoint = ScoreCheckpoint(Path(resume_dir) / CHECKPOINT_NAME, key)
    resumed = checkpoint.resumed if checkpoint else 0
    cache_info: dict[str, Any] | None = None
    cache_key_ = None
    if score_cache is not None:
        cache_key_, cache_info = _cache_identity(
            spec, loaded, calibrated, candidates, num_blocks, score_cache, cache_dir
        )
        timer("fingerprint_s")

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
            result = _cached_result(spec, cached, candidates)
            reused = sum(score is not None for score in result.block_scores)
        message: str = spec.criterion
        if reused:
            message = f"{spec.criterion} (reusing {reused} cached block scores)"
        elif resumed:
            message = f"{spec.criterion} (resuming {resumed} saved block scores)"
        progress(Progress("scoring", 0, 0, "blocks", message=message))
        if result is None:
            context = ScoringContext(
                loaded.model,
                loaded.adapter,
                calibrated.windows,
                candidates,
                num_blocks,
                spec.batch_size,
                progress,
                gradient_batch_size=spec.taylor_batch_size,
                score_all_blocks=spec.score_all_blocks,
                checkpoint=checkpoint,
            )
            result = CRITERIA[spec.criterion](context)
            if score_cache is not None and cache_key_:
                _save_to_cache(spec, score_cache, cache_key_, cache_info, checkpoint, result)
    if cache_info is not None:
        computed = sum(score is not None for score in result.block_scores) - reused
        cache_info.update(reused_scores=reused, computed_scores=max(computed, 0), hit=reused > 0)
    return BlockScores(result, resumed, cache_info)


def _cache_identity(
    spec: PruneSpec,
    loaded: LoadedModel,
    calibrated: Calibrated,
    candidates: list[int],
    num_blocks: int,
    score_cache: ScoreCache,
    cache_dir: Path | None,
) -> tuple[str, dict[str, Any]]:
    """The cache key of this run's scores, and the report's ``score_cache`` entry so far."""
    model_fp = model_fingerprint(
        loaded.resolved.path_or_id,
        loaded.resolved.revision,
        loaded.model.config,
        memo_path=Path(cache_dir) / "fingerprints.json" if cache_dir else None,
    )
    key = cache_key(
        model=model_fp,
        criterion=spec.criterion,
        criterion_version=CRITERION_VERSIONS[spec.criterion],
        calibration=calibrated.fingerprint,
        sampling=calibrated.sampling,
        dtype=str(loaded.dtype),
        device_type=loaded.device.type,
        num_layers=loaded.adapter.num_layers(loaded.model),
        candidates=candidates,
        num_blocks=num_blocks,
    )
    return key, {"key": key, "model_fingerprint": model_fp, "location": score_cache.location(key)}


def _cached_result(
    spec: PruneSpec, cached: dict[str, Any], candidates: list[int]
) -> CriterionResult:
    scores = cached["block_scores"]
    order = (
        sorted(candidates, key=lambda b: (scores[b], b))
        if spec.criterion in ORDER_FROM_SCORES
        else cached["removal_order"]
    )
    return CriterionResult(scores, order, cached.get("details", {}))


def _save_to_cache(
    spec: PruneSpec,
    score_cache: ScoreCache,
    key: str,
    cache_info: dict[str, Any] | None,
    checkpoint: ScoreCheckpoint | None,
    result: CriterionResult,
) -> None:
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
        score_cache.save(key, entry)
    except Exception as exc:  # the scores are still good for this run
        log.warning("could not save block scores to the cache: %s", exc)
