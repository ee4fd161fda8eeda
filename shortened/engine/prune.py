"""One-shot depth pruning: load, calibrate, score, remove blocks, save a checkpoint + report.

Before saving, the scores and the pruned weights are checked for NaN and infinity
(``finite.py``) and the pruned model's held-out perplexity against its parent's
(``quality_gate.py``): a broken or collapsed model fails the job and is never written.

The output directory is written atomically: everything goes to a temporary sibling that is
renamed into place at the end, so a failure or cancellation never leaves a half-written
checkpoint that looks complete.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.planning import blocks_for_ratio, removable_blocks
from shortened.render import block_score_svg
from shortened.specs import PruneSpec

from .architectures import keep_blocks
from .calibration import SAMPLING_VERSIONS, calibration_draw, fingerprint
from .criteria import CRITERION_VERSIONS
from .errors import DataError, NothingToPrune
from .expert_pruning import check_expert_spec, prune_experts_by_frequency
from .finite import check_finite, check_finite_weights
from .models import LoadedModel, count_parameters, load_model
from .moe import before_removal, ratio_basis, report_fields
from .outputs import PhaseTimer, atomic_output_dir, check_output_dir, library_versions, save_model
from .progress import Progress, ProgressCallback, no_progress
from .quality_gate import (
    Gate,
    calibration_documents,
    gate_fields,
    held_out_windows,
    judge,
    measure_parent,
    unmeasured,
    windows_perplexity,
)
from .score_cache import ScoreCache
from .scoring import BlockScores, Calibrated, score_blocks

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

log = logging.getLogger(__name__)


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


@dataclass
class RemovalPlan:
    """What the model and the spec fix before any scoring: which blocks may go, how many will."""

    num_layers: int
    params_before: int
    candidates: list[int]  # removable original block indices
    protected: list[int]
    num_blocks: int


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
    timer = PhaseTimer()

    progress(Progress("loading", message=spec.model))
    loaded = load_model(
        spec.model, dtype=spec.dtype, device=spec.device, store=store, cache_dir=cache_dir
    )
    plan = plan_removal(spec, loaded)
    if spec.expert_pruning is not None:  # refused before any scoring
        check_expert_spec(loaded.model, loaded.adapter, **spec.expert_pruning.model_dump())
    timer("load_s")

    calibrated = calibrate(spec, loaded, progress=progress, store=store, cache_dir=cache_dir)
    timer("calibration_s")

    scores = score_blocks(
        spec,
        loaded,
        calibrated,
        plan.candidates,
        plan.num_blocks,
        progress=progress,
        timer=timer,
        cache_dir=cache_dir,
        resume_dir=resume_dir,
        score_cache=score_cache,
    )
    timer("scoring_s")
    moe_before = before_removal(loaded.model, loaded.adapter, calibrated.windows, spec.batch_size)

    check_finite(scores.result.block_scores, "the block scores")
    gate = parent_gate(
        spec, loaded, calibrated, progress=progress, store=store, cache_dir=cache_dir
    )
    timer("quality_gate_parent_s")

    progress(Progress("pruning", message=f"removing {plan.num_blocks} blocks"))
    removed = remove_blocks(loaded, scores, plan)
    experts = remove_experts(spec, loaded, calibrated)
    timer("pruning_s")

    report = prune_report(spec, loaded, plan, scores, removed, calibrated, timer)
    report.update(report_fields(loaded.model, loaded.adapter, spec.ratio_of, moe_before))
    report["expert_pruning"] = experts
    report.update(gate_fields(pruned_gate(gate, loaded, spec.batch_size)))
    timer("quality_gate_s")
    check_finite_weights(loaded.model, "in the pruned model")
    progress(Progress("saving", message=str(output_dir)))
    save_pruned(loaded, report, output_dir, timer, max_shard_size=spec.max_shard_size)
    log.info(
        "pruned %s: removed %s, %d -> %d params",
        spec.model,
        removed,
        report["params_before"],
        report["params_after"],
    )
    return report


def calibrate(
    spec: PruneSpec,
    loaded: LoadedModel,
    *,
    progress: ProgressCallback,
    store: ArtifactStore | None,
    cache_dir: Path | None,
) -> Calibrated:
    """The calibration windows (drawn as ``spec.calibration.sampling`` says), or none for a
    data-free criterion given no data."""
    if spec.calibration is None:
        return Calibrated(torch.empty((0, 0), dtype=torch.long), "none", "none", None)
    source = spec.calibration.source or spec.calibration.dataset
    progress(Progress("calibration", message=str(source)))
    draw = calibration_draw(spec.calibration, loaded.tokenizer, store=store, cache_dir=cache_dir)
    calibration_fp = fingerprint(draw.tokens)
    report = {
        **spec.calibration.model_dump(),
        **draw.record(),
        "windows": list(draw.tokens.shape),
        "fingerprint": calibration_fp,
    }
    return Calibrated(draw.tokens, calibration_fp, SAMPLING_VERSIONS[draw.sampling], report)


@dataclass
class PendingGate:
    """The parent's side of the quality gate, measured before any block is removed."""

    gate: Gate | None  # None: the gate is off or could not be measured
    windows: torch.Tensor | None
    unmeasured: dict[str, Any] | None  # the report section when there is nothing to compare


def parent_gate(
    spec: PruneSpec,
    loaded: LoadedModel,
    calibrated: Calibrated,
    *,
    progress: ProgressCallback,
    store: ArtifactStore | None,
    cache_dir: Path | None,
) -> PendingGate:
    """Held-out windows (calibration documents no scoring window was drawn from) and the
    unpruned model's perplexity on them (``quality_gate.py``)."""
    gate_spec = spec.quality_gate
    if gate_spec.max_ppl_ratio is None:
        return PendingGate(None, None, unmeasured(gate_spec, "turned off (max_ppl_ratio null)"))
    if spec.calibration is None or calibrated.report is None:
        return PendingGate(None, None, unmeasured(gate_spec, "no calibration data"))
    documents = calibration_documents(
        spec.calibration, loaded.tokenizer, store=store, cache_dir=cache_dir
    )
    used = set(calibrated.report["document_indices"])
    try:
        windows = held_out_windows(
            documents,
            (i for i in range(len(documents)) if i not in used),
            loaded.tokenizer,
            spec.calibration,
            gate_spec.windows,
        )
    except DataError:
        reason = "every calibration document long enough was used for scoring"
        return PendingGate(None, None, unmeasured(gate_spec, reason))
    progress(Progress("quality_gate", message=f"parent on {len(windows)} held-out windows"))
    source = "calibration documents not used for scoring"
    gate = measure_parent(
        gate_spec,
        lambda: windows_perplexity(loaded.model, windows, spec.batch_size),
        len(windows),
        source,
    )
    return PendingGate(gate, windows, None)


def pruned_gate(pending: PendingGate, loaded: LoadedModel, batch_size: int) -> dict[str, Any]:
    """The pruned model's side of the gate: its report section, or ``QualityGateFailed``."""
    if pending.gate is None or pending.windows is None:
        assert pending.unmeasured is not None
        return pending.unmeasured
    windows = pending.windows
    return judge(
        pending.gate, lambda: windows_perplexity(loaded.model, windows, batch_size), "pruned model"
    )


def plan_removal(spec: PruneSpec, loaded: LoadedModel) -> RemovalPlan:
    """The removable blocks and the block count (given, or from ``target_ratio``); raises
    ``NothingToPrune`` when the protected blocks leave too few."""
    model, adapter = loaded.model, loaded.adapter
    num_layers = adapter.num_layers(model)
    params_before = count_parameters(model)
    basis, block_params = ratio_basis(model, adapter, spec.ratio_of)
    candidates = removable_blocks(num_layers, spec.protect_first, spec.protect_last)
    protected = [b for b in range(num_layers) if b not in candidates]
    if spec.num_blocks is not None:
        num_blocks = spec.num_blocks
    else:
        assert spec.target_ratio is not None
        if not candidates:
            num_blocks = 0
        else:
            # The blocks that may go (an MoE model's dense leading blocks differ in size).
            removable = [block_params[i] for i in candidates]
            num_blocks = blocks_for_ratio(basis, removable, spec.target_ratio, len(candidates))
    if num_blocks >= num_layers:  # with protection off every block is a candidate
        raise NothingToPrune(
            f"asked to remove {num_blocks} of {num_layers} blocks: a model needs at least one"
        )
    if not candidates or num_blocks > len(candidates):
        raise NothingToPrune(
            f"asked to remove {num_blocks} of {num_layers} blocks but only {len(candidates)} are removable "
            f"(protect_first={spec.protect_first}, protect_last={spec.protect_last})"
        )
    return RemovalPlan(num_layers, params_before, candidates, protected, num_blocks)


def remove_blocks(loaded: LoadedModel, scores: BlockScores, plan: RemovalPlan) -> list[int]:
    """Drop the first ``num_blocks`` of the removal order from the model; the removed indices."""
    removed = sorted(scores.result.removal_order[: plan.num_blocks])
    keep_blocks(loaded.model, [b for b in range(plan.num_layers) if b not in removed])
    return removed


def remove_experts(
    spec: PruneSpec, loaded: LoadedModel, calibrated: Calibrated
) -> dict[str, Any] | None:
    """``spec.expert_pruning`` on the depth-pruned model: its routing counts are the kept
    blocks' on the inputs they now see. The report section, or None when not asked for."""
    if spec.expert_pruning is None:
        return None
    return prune_experts_by_frequency(
        loaded.model,
        loaded.adapter,
        calibrated.windows,
        spec.batch_size,
        keep_experts=spec.expert_pruning.keep_experts,
        keep_fraction=spec.expert_pruning.keep_fraction,
    )


def prune_report(
    spec: PruneSpec,
    loaded: LoadedModel,
    plan: RemovalPlan,
    scores: BlockScores,
    removed: list[int],
    calibrated: Calibrated,
    timer: PhaseTimer,
) -> dict[str, Any]:
    result, cache_info = scores.result, scores.cache_info
    kept = [b for b in range(plan.num_layers) if b not in removed]
    params_after = count_parameters(loaded.model)
    return {
        "model": spec.model,
        # The immutable commit a hub model (hf://org/name@revision) was resolved to.
        "model_commit": loaded.resolved.commit,
        "architecture": loaded.adapter.name,
        "model_type": loaded.model.config.model_type,
        "criterion": spec.criterion,
        "criterion_version": CRITERION_VERSIONS[spec.criterion],
        "block_scores": result.block_scores,
        "score_meaning": "lower = less important (removed first)",
        "removal_order": result.removal_order,
        "removed_blocks": removed,
        "kept_blocks": kept,
        "protected_blocks": plan.protected,
        "num_layers_before": plan.num_layers,
        "num_layers_after": len(kept),
        "num_blocks_removed": plan.num_blocks,
        "target_ratio": spec.target_ratio,
        "params_before": plan.params_before,
        "params_after": params_after,
        "params_removed_ratio": round(1 - params_after / plan.params_before, 6),
        "criterion_details": result.details,
        "resumed_scores": scores.resumed,
        # Block scores taken from the score cache instead of computed (0: none).
        "scores_reused": cache_info["reused_scores"] if cache_info else 0,
        "score_cache": cache_info,
        # What was drawn: sampling name and version, seed, document indices and window starts,
        # so a run can be reproduced and compared with the paper's code (None: no data used).
        "calibration": calibrated.report,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "versions": library_versions(),
        "timings": timer.timings,  # the same dict: saving_s is added while saving
    }


def save_pruned(
    loaded: LoadedModel,
    report: dict[str, Any],
    output_dir: Path,
    timer: PhaseTimer,
    *,
    max_shard_size: str | None = None,
) -> None:
    """The checkpoint (in its source precision, sharded like its source unless
    ``max_shard_size``), report.json and the block-score CSV and chart, all appearing at
    ``output_dir`` at once."""
    with atomic_output_dir(output_dir) as staging:
        save_model(
            loaded.model,
            loaded.tokenizer,
            staging,
            loaded.source_dtype,
            restore_dtype=False,
            processor=loaded.processor,
            max_shard_size=max_shard_size or loaded.source_shard_size,
        )
        timer("saving_s")
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        write_scores_csv(staging / "block_scores.csv", report)
        (staging / "block_scores.svg").write_text(block_score_svg(report))
