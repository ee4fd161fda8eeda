"""Choosing the pruning for a budget: try every criterion at every admissible block count,
rank the candidates by perplexity on held-out data, prune with the best.

The recipe (``search_model``): load -> split the calibration documents -> score once per
criterion -> build the candidate removal sets -> evaluate each on the validation windows
(blocks removed temporarily with ``block_view``, nothing copied) -> rank -> prune with the
winner and save it like ``prune_model`` does, with a ``search`` section in report.json.
Candidates whose perplexity is not finite rank last and are never published; the winner must
pass the quality gate (its validation perplexity against the unpruned model's on the same
windows, ``quality_gate.py``) or the job fails and nothing is saved.

The budget admits a set of block counts k (L blocks before, ``removable`` of them not
protected):

* ``target_ratio``: the one count prune chooses for that ratio (``blocks_for_ratio``), so a
  search and a prune of the same ratio give models of the same size; the search picks the
  criterion;
* ``num_blocks: {min, max}``: every count in the range;
* ``min_speedup``: every count whose *estimated* speed-up L / (L - k) reaches it. That is
  the ideal depth speed-up: decoding time proportional to the number of blocks, embeddings,
  final norm and LM head taken as free. Measured speed-ups are lower (the paper's Table 5),
  so treat it as an upper bound.

A criterion whose removal order does not depend on the count (all but ``angular``) is
scored once; ``iterative_ppl`` is scored for the largest count (its greedy order for
fewer blocks is a prefix of that). ``angular`` picks a contiguous run per count and is
scored once per count. Scores go through the score cache as prune's do (``scoring.py``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import PruneSpec, SearchSpec

from .architectures import block_view, keep_blocks
from .calibration import SAMPLING_VERSIONS, draw_windows, fingerprint
from .errors import CalibrationError, NonFinite, NothingToPrune
from .evaluate import window_nll
from .finite import check_finite, check_finite_weights
from .models import LoadedModel, count_parameters, load_model
from .moe import ratio_basis
from .outputs import PhaseTimer, check_output_dir
from .progress import Progress, ProgressCallback, no_progress
from .prune import RemovalPlan, blocks_for_ratio, prune_report, removable_blocks, save_pruned
from .quality_gate import (
    calibration_documents,
    gate_fields,
    held_out_windows,
    judge,
    measure_parent,
    unmeasured,
    windows_perplexity,
)
from .score_cache import ORDER_FROM_SCORES, PER_SCOPE, ScoreCache
from .scoring import BlockScores, Calibrated, score_blocks

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

SEARCH_VERSION = 1


# ----------------------------------------------------------------------------- the budget


def estimated_speedup(num_layers: int, num_blocks: int) -> float:
    """The ideal depth speed-up of removing ``num_blocks`` of ``num_layers`` blocks."""
    return num_layers / (num_layers - num_blocks)


def admissible_counts(
    spec: SearchSpec, num_layers: int, removable: int, params_before: int, block_params: list[int]
) -> list[int]:
    """The block counts the budget allows, ascending; ``NothingToPrune`` when none is."""
    most = min(removable, num_layers - 1)  # a model keeps at least one block
    if spec.target_ratio is not None:
        counts = [blocks_for_ratio(params_before, block_params, spec.target_ratio, most)]
    elif spec.num_blocks is not None:
        counts = list(range(spec.num_blocks.min, min(spec.num_blocks.max, most) + 1))
    else:
        assert spec.min_speedup is not None
        counts = [
            k for k in range(1, most + 1) if estimated_speedup(num_layers, k) >= spec.min_speedup
        ]
    if most < 1 or not counts:
        raise NothingToPrune(
            f"no block count within the budget: the model has {num_layers} blocks, {removable} "
            f"removable (protect_first={spec.protect_first}, protect_last={spec.protect_last})"
        )
    return counts


# ------------------------------------------------------------------------ the data split


def split_documents(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(scoring, validation)`` document indices, disjoint and covering ``range(count)``:
    a ``random.Random(seed)`` shuffle of the indices, the first ``ceil(fraction * count)``
    (at least one, and one fewer than all) held out; both lists ascending."""
    if count < 2:
        raise CalibrationError(
            f"the calibration data has {count} document(s): a search needs at least two, "
            "some to score on and some held out to validate"
        )
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held_out = min(max(1, math.ceil(fraction * count)), count - 1)
    return sorted(order[held_out:]), sorted(order[:held_out])


class _Subset(Sequence[str]):
    """Some documents of a sequence, by index, read on demand (an HF dataset stays lazy)."""

    def __init__(self, documents: Sequence[str], indices: list[int]) -> None:
        self.documents, self.indices = documents, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: Any) -> Any:
        return self.documents[self.indices[index]]


@dataclass
class SplitData:
    scoring: Calibrated  # windows drawn from the scoring documents only
    validation: torch.Tensor  # [n, seq_len] windows of the held-out documents
    scoring_documents: list[int]
    validation_documents: list[int]


def split_calibration(
    spec: SearchSpec, tokenizer: Any, store: ArtifactStore | None, cache_dir: Path | None
) -> SplitData:
    """Scoring windows from one part of the documents, validation windows from the rest
    (see ``SearchValidationSpec``). Window document indices in the report are indices
    into the whole file, as prune reports them."""
    documents = calibration_documents(spec.calibration, tokenizer, store=store, cache_dir=cache_dir)
    scoring_ids, validation_ids = split_documents(
        len(documents), spec.validation.fraction, spec.validation.seed
    )
    draw = draw_windows(_Subset(documents, scoring_ids), tokenizer, spec.calibration)
    draw.documents = [scoring_ids[i] for i in draw.documents]
    try:
        validation = held_out_windows(
            documents, validation_ids, tokenizer, spec.calibration, spec.validation.max_windows
        )
    except Exception as exc:
        raise CalibrationError(
            f"the {len(validation_ids)} held-out documents are too short for one validation "
            f"window of {spec.calibration.seq_len} tokens: raise validation.fraction or add data"
        ) from exc
    calibration_fp = fingerprint(draw.tokens)
    report = {
        **spec.calibration.model_dump(),
        **draw.record(),
        "windows": list(draw.tokens.shape),
        "fingerprint": calibration_fp,
    }
    scoring = Calibrated(draw.tokens, calibration_fp, SAMPLING_VERSIONS[draw.sampling], report)
    return SplitData(scoring, validation, scoring_ids, validation_ids)


# ---------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    removed: list[int]  # original block indices, ascending
    criteria: list[str]  # every criterion that chose exactly this set
    scores: BlockScores  # the first criterion's (the winner's report is built from them)
    params_after: int = 0
    validation_ppl: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.removed)


def _prune_spec(spec: SearchSpec, criterion: str, num_blocks: int) -> PruneSpec:
    """The prune spec equivalent to one candidate (scoring reads it; the report records it)."""
    shared = spec.model_dump(
        include={"model", "protect_first", "protect_last", "batch_size", "taylor_batch_size"}
        | {"dtype", "device", "calibration"}
    )
    return PruneSpec.model_validate({**shared, "criterion": criterion, "num_blocks": num_blocks})


def build_candidates(
    spec: SearchSpec,
    loaded: LoadedModel,
    calibrated: Calibrated,
    plan: RemovalPlan,
    counts: list[int],
    *,
    progress: ProgressCallback,
    timer: PhaseTimer,
    cache_dir: Path | None,
    score_cache: ScoreCache | None,
) -> list[Candidate]:
    """One candidate per distinct removal set over criteria x counts, in the order found."""
    found: dict[tuple[int, ...], Candidate] = {}
    for criterion in spec.criteria:
        per_count = criterion not in ORDER_FROM_SCORES and criterion not in PER_SCOPE
        scored: BlockScores | None = None
        for k in counts:
            if scored is None or per_count:
                scored = score_blocks(
                    _prune_spec(spec, criterion, k if per_count else counts[-1]),
                    loaded,
                    calibrated,
                    plan.candidates,
                    k if per_count else counts[-1],
                    progress=progress,
                    timer=timer,
                    cache_dir=cache_dir,
                    resume_dir=None,
                    score_cache=score_cache,
                )
            removed = tuple(sorted(scored.result.removal_order[:k]))
            if removed in found:
                found[removed].criteria.append(criterion)
            else:
                found[removed] = Candidate(list(removed), [criterion], scored)
    return list(found.values())


def evaluate_candidates(
    loaded: LoadedModel,
    candidates: list[Candidate],
    validation: torch.Tensor,
    plan: RemovalPlan,
    batch_size: int,
    progress: ProgressCallback,
) -> None:
    """Each candidate's validation perplexity, measured with its blocks left out for the
    duration of the forward passes only."""
    block_params = [count_parameters(b) for b in loaded.adapter.layers(loaded.model)]
    for i, candidate in enumerate(candidates):
        kept = [b for b in range(plan.num_layers) if b not in candidate.removed]
        with block_view(loaded.model, kept):
            nll = window_nll(loaded.model, validation, batch_size)
        candidate.validation_ppl = math.exp(float(nll.mean()))
        candidate.params_after = plan.params_before - sum(
            block_params[b] for b in candidate.removed
        )
        progress(
            Progress(
                "validation",
                i + 1,
                len(candidates),
                "candidates",
                message=f"{'/'.join(candidate.criteria)} removing {candidate.removed}",
                metrics={"ppl": candidate.validation_ppl},
            )
        )


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Lowest validation perplexity first; a tie goes to the smaller model, then to the
    order the criteria were given in (the candidates' order)."""
    order = {id(c): i for i, c in enumerate(candidates)}
    finite = [c for c in candidates if math.isfinite(c.validation_ppl)]
    rest = [c for c in candidates if not math.isfinite(c.validation_ppl)]
    return sorted(finite, key=lambda c: (c.validation_ppl, c.params_after, order[id(c)])) + rest


def ranking_rows(ranked: list[Candidate], plan: RemovalPlan) -> list[dict[str, Any]]:
    """The ranked table of report.json's ``search`` section, best first."""
    return [
        {
            "rank": i + 1,
            "criterion": c.criteria[0],
            "criteria": c.criteria,
            "num_blocks": c.num_blocks,
            "removed_blocks": c.removed,
            "params_after": c.params_after,
            "params_removed_ratio": round(1 - c.params_after / plan.params_before, 6),
            "estimated_speedup": round(estimated_speedup(plan.num_layers, c.num_blocks), 4),
            "validation_ppl": c.validation_ppl if math.isfinite(c.validation_ppl) else None,
        }
        for i, c in enumerate(ranked)
    ]


# ------------------------------------------------------------------------------- recipe


def plan_search(spec: SearchSpec, loaded: LoadedModel) -> tuple[RemovalPlan, list[int]]:
    """The removable blocks and the admissible block counts (the plan's count: the largest)."""
    model, adapter = loaded.model, loaded.adapter
    num_layers = adapter.num_layers(model)
    params_before = count_parameters(model)
    basis, block_params = ratio_basis(model, adapter, spec.ratio_of)
    removable = removable_blocks(num_layers, spec.protect_first, spec.protect_last)
    sizes = [block_params[i] for i in removable]  # the blocks that may go
    counts = admissible_counts(spec, num_layers, len(removable), basis, sizes)
    protected = [b for b in range(num_layers) if b not in removable]
    return RemovalPlan(num_layers, params_before, removable, protected, counts[-1]), counts


def search_model(
    spec: SearchSpec,
    output_dir: Path,
    *,
    progress: ProgressCallback = no_progress,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
    score_cache: ScoreCache | None = None,
) -> dict[str, Any]:
    """Find the best pruning of ``spec.model`` within the budget and save it to
    ``output_dir`` (the files ``prune_model`` writes); returns the report, whose ``search``
    section ranks every candidate evaluated."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    timer = PhaseTimer()

    progress(Progress("loading", message=spec.model))
    loaded = load_model(
        spec.model, dtype=spec.dtype, device=spec.device, store=store, cache_dir=cache_dir
    )
    plan, counts = plan_search(spec, loaded)
    timer("load_s")

    progress(
        Progress("calibration", message=str(spec.calibration.source or spec.calibration.dataset))
    )
    data = split_calibration(spec, loaded.tokenizer, store, cache_dir)
    timer("calibration_s")

    candidates = build_candidates(
        spec,
        loaded,
        data.scoring,
        plan,
        counts,
        progress=progress,
        timer=timer,
        cache_dir=cache_dir,
        score_cache=score_cache,
    )
    timer("scoring_s")

    gate = measure_parent(
        spec.quality_gate,
        lambda: windows_perplexity(loaded.model, data.validation, spec.batch_size),
        len(data.validation),
        "the search's validation windows",
    )
    evaluate_candidates(loaded, candidates, data.validation, plan, spec.batch_size, progress)
    ranked = rank(candidates)
    best = ranked[0]
    if not math.isfinite(best.validation_ppl):
        raise NonFinite(
            f"the validation perplexity of every one of the {len(ranked)} candidates is not "
            "finite: the model's outputs are broken"
        )
    gate_section = (
        unmeasured(spec.quality_gate, "turned off (max_ppl_ratio null)")
        if gate is None
        else judge(gate, lambda: best.validation_ppl, "best candidate")
    )
    timer("validation_s")

    progress(Progress("pruning", message=f"removing {best.num_blocks} blocks ({best.criteria[0]})"))
    keep_blocks(loaded.model, [b for b in range(plan.num_layers) if b not in best.removed])
    timer("pruning_s")

    winner_plan = RemovalPlan(
        plan.num_layers, plan.params_before, plan.candidates, plan.protected, best.num_blocks
    )
    winner_spec = _prune_spec(spec, best.criteria[0], best.num_blocks)
    report = prune_report(
        winner_spec, loaded, winner_plan, best.scores, best.removed, data.scoring, timer
    )
    report["target_ratio"] = spec.target_ratio
    report["search"] = search_section(spec, plan, counts, ranked, data)
    report.update(gate_fields(gate_section))
    check_finite(report["block_scores"], "the block scores")
    check_finite_weights(loaded.model, "in the pruned model")
    progress(Progress("saving", message=str(output_dir)))
    save_pruned(loaded, report, output_dir, timer)
    return report


def search_section(
    spec: SearchSpec, plan: RemovalPlan, counts: list[int], ranked: list[Candidate], data: SplitData
) -> dict[str, Any]:
    budget: dict[str, Any]
    if spec.target_ratio is not None:
        budget = {"target_ratio": spec.target_ratio}
    elif spec.num_blocks is not None:
        budget = {"num_blocks": spec.num_blocks.model_dump()}
    else:
        budget = {"min_speedup": spec.min_speedup}
    return {
        "version": SEARCH_VERSION,
        "budget": budget,
        "block_counts": counts,
        "criteria": list(spec.criteria),
        "speedup_estimate": "L / (L - k): ideal depth speed-up, L blocks before, k removed",
        "num_layers_before": plan.num_layers,
        "params_before": plan.params_before,
        "validation": {
            **spec.validation.model_dump(),
            "windows": list(data.validation.shape),
            "scoring_documents": len(data.scoring_documents),
            "validation_documents": data.validation_documents,
        },
        "best": ranking_rows(ranked[:1], plan)[0],
        "ranking": ranking_rows(ranked, plan),
    }
