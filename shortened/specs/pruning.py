"""The pruning jobs' specs: ``PruneSpec`` (one-shot depth pruning) and ``SearchSpec`` (choose
the criterion and block count for a budget on held-out data), the block-importance criteria
they name, and what the two share (the model, protected blocks, scoring settings, and the
pipeline that continues with the pruned model).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .calibration import CalibrationSpec
from .common import (
    MAX_BLOCKS,
    Device,
    ModelSource,
    Seed,
    ShardSize,
    StrictModel,
    WeightsDtype,
    check_source,
)
from .export import PipelineExport
from .pipeline import PipelineEval, PipelineRetrain
from .quality_gate import QualityGateSpec
from .tracking import JobSpecBase

Criterion = Literal["ppl", "taylor", "magnitude", "block_influence", "angular", "iterative_ppl"]
RatioOf = Literal["total", "active"]
CRITERIA: tuple[str, ...] = Criterion.__args__  # type: ignore[attr-defined]
# Criteria that score blocks from the weights alone and so need no calibration data.
DATA_FREE_CRITERIA: tuple[str, ...] = ("magnitude",)
# Criteria that score every block once; a search tries these unless told otherwise
# (iterative_ppl re-scores after every removal, L times the cost of ppl).
ONE_SHOT_CRITERIA: tuple[str, ...] = ("ppl", "taylor", "magnitude", "block_influence", "angular")
MAX_SPEEDUP = float(MAX_BLOCKS)  # L / (L - k) never exceeds the layer count


class _PruningJob(JobSpecBase):
    """What a prune and a search job share: the model, which blocks are off limits, how
    scoring runs, and the optional pipeline that continues with the pruned model."""

    model: ModelSource
    protect_first: int = Field(
        default=4, ge=0, le=MAX_BLOCKS, description="Leading blocks never removed"
    )
    protect_last: int = Field(
        default=2, ge=0, le=MAX_BLOCKS, description="Trailing blocks never removed"
    )
    batch_size: int = Field(default=4, ge=1, le=1024, description="Calibration windows per forward")
    taylor_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="taylor: windows per loss (the paper's --batch_size; default all n_samples at "
        "once, as its code). Forwards still take batch_size windows; the gradient is exact.",
    )
    ratio_of: RatioOf = Field(
        default="total",
        description="What target_ratio is a fraction of: every parameter ('total') or those "
        "used per token ('active': a mixture-of-experts block's routed experts counted "
        "num_experts_per_tok times); the same for dense models",
    )
    dtype: WeightsDtype = "auto"
    device: Device = "auto"
    max_shard_size: ShardSize = None
    quality_gate: QualityGateSpec = Field(
        default_factory=QualityGateSpec,
        description="Fail, publishing nothing, when the pruned model's held-out perplexity "
        "exceeds its parent's by more than max_ppl_ratio",
    )
    retrain: PipelineRetrain | None = Field(
        default=None,
        description="Pipeline: retrain the pruned model when this job succeeds (a follow-up job)",
    )
    eval: PipelineEval | None = Field(
        default=None,
        description="Pipeline: evaluate the pruned (or, with 'retrain', the retrained) model",
    )
    export: PipelineExport | None = Field(
        default=None,
        description="Pipeline: export the pruned (or retrained) model to deployable, verified "
        "artifacts (GGUF, quantized checkpoints) as the last step",
    )

    @field_validator("model")
    @classmethod
    def _model_ok(cls, value: str) -> str:
        return check_source(value)


class ExpertPruningSpec(StrictModel):
    """Routing-frequency expert pruning after block removal: every kept mixture-of-experts
    block keeps the experts the calibration windows put most often in a token's top-k
    (``shortened.engine.expert_pruning``). Exactly one of ``keep_experts`` and
    ``keep_fraction``; at least ``num_experts_per_tok`` experts are kept."""

    keep_experts: int | None = Field(
        default=None, ge=1, le=1 << 14, description="Experts each MoE block keeps"
    )
    keep_fraction: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="Share of each MoE block's experts it keeps (rounded up)",
    )

    @model_validator(mode="after")
    def _one_count(self) -> ExpertPruningSpec:
        if (self.keep_experts is None) == (self.keep_fraction is None):
            raise ValueError("give exactly one of 'keep_experts' and 'keep_fraction'")
        return self


class PruneSpec(_PruningJob):
    """One-shot depth pruning: score blocks, remove the least important, save a checkpoint."""

    criterion: Criterion = Field(default="ppl", description="Block-importance criterion")
    num_blocks: int | None = Field(
        default=None, ge=1, le=MAX_BLOCKS, description="Number of blocks to remove"
    )
    target_ratio: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="Fraction of parameters to remove"
    )
    calibration: CalibrationSpec | None = Field(
        default=None, description="Calibration text; required by every criterion but magnitude"
    )
    score_all_blocks: bool = Field(
        default=False, description="ppl: also score protected blocks (full profile, slower)"
    )
    expert_pruning: ExpertPruningSpec | None = Field(
        default=None,
        description="Mixture of experts: also remove, in every kept MoE block, the experts the "
        "calibration text routes to least (needs calibration)",
    )

    @model_validator(mode="after")
    def _one_target(self) -> PruneSpec:
        if (self.num_blocks is None) == (self.target_ratio is None):
            raise ValueError("give exactly one of 'num_blocks' and 'target_ratio'")
        if self.calibration is None and self.criterion not in DATA_FREE_CRITERIA:
            raise ValueError(calibration_needed(self.criterion))
        if self.expert_pruning is not None and self.calibration is None:
            raise ValueError(
                "expert_pruning needs calibration data: it counts which experts the "
                "calibration tokens are routed to"
            )
        return self


class BlockRange(StrictModel):
    """Block counts ``min``..``max`` (both included)."""

    min: int = Field(ge=1, le=MAX_BLOCKS, description="Fewest blocks to remove")
    max: int = Field(ge=1, le=MAX_BLOCKS, description="Most blocks to remove")

    @model_validator(mode="after")
    def _ordered(self) -> BlockRange:
        if self.min > self.max:
            raise ValueError(f"'min' ({self.min}) must not exceed 'max' ({self.max})")
        return self


class SearchValidationSpec(StrictModel):
    """The held-out part of the calibration data that ranks the candidates.

    The calibration *documents* are split before any window is drawn: a seeded shuffle of
    the document indices, the first ``fraction`` of them (at least one) held out. Scoring
    windows are drawn from the rest as ``calibration`` says; validation windows are the
    held-out documents concatenated and cut into non-overlapping ``calibration.seq_len``
    windows (the perplexity protocol), the first ``max_windows`` of them."""

    fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Share of the documents held out for validation"
    )
    seed: Seed = Field(default=0, description="Seed of the document split")
    max_windows: int = Field(
        default=16, ge=1, le=100_000, description="Validation windows per candidate"
    )


class SearchSpec(_PruningJob):
    """Choose the pruning for a budget: score the blocks with each criterion, evaluate every
    candidate removal within the budget on held-out data, prune with the best.

    The budget is exactly one of: ``target_ratio`` (the block count prune would choose for
    it: the search picks the criterion), ``num_blocks`` (a range of counts), ``min_speedup``
    (every count whose ideal depth speed-up L / (L - k) reaches it)."""

    criteria: list[Criterion] = Field(
        default_factory=lambda: list(ONE_SHOT_CRITERIA),  # type: ignore[arg-type]  # names checked against Criterion by a test
        min_length=1,
        max_length=len(CRITERIA),
        description="Criteria to try (default: every one-shot criterion)",
    )
    target_ratio: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="Fraction of parameters to remove"
    )
    num_blocks: BlockRange | None = Field(
        default=None, description="Range of block counts to remove"
    )
    min_speedup: float | None = Field(
        default=None,
        gt=1.0,
        le=MAX_SPEEDUP,
        description="Least estimated speed-up L / (L - k), L blocks before, k removed",
    )
    calibration: CalibrationSpec = Field(
        description="Calibration text, split into scoring and validation documents"
    )
    validation: SearchValidationSpec = Field(
        default_factory=SearchValidationSpec, description="The held-out validation part"
    )

    @field_validator("criteria")
    @classmethod
    def _distinct(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("each criterion at most once")
        return values

    @model_validator(mode="after")
    def _one_budget(self) -> SearchSpec:
        given = [self.target_ratio, self.num_blocks, self.min_speedup]
        if sum(value is not None for value in given) != 1:
            raise ValueError("give exactly one of 'target_ratio', 'num_blocks' and 'min_speedup'")
        return self


def calibration_needed(criterion: str) -> str:
    """Why a criterion cannot run without calibration data (API and CLI message)."""
    return (
        f"criterion {criterion!r} needs calibration data: it scores blocks from the model's "
        "outputs (perplexity, gradients or hidden states) on calibration text; give 'calibration' "
        f"with a 'source' or 'dataset' (only {', '.join(DATA_FREE_CRITERIA)} needs no data)"
    )
