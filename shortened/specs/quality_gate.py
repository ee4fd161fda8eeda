"""The quality gate of a job that publishes a model (prune, search, retrain): its output's
perplexity on held-out text is compared with its parent's, and an output worse than
``max_ppl_ratio`` times the parent's is a collapsed model, failed with ``quality_gate`` and
never published.
"""

from __future__ import annotations

from pydantic import Field

from .common import StrictModel

# A ratio only a collapsed model reaches (docs/quality-gate.md has the measurements): on
# models/tiny-llama every criterion removing 2-6 of 12 blocks stays under 2.1x its parent,
# while a model that lost its depth (2 blocks kept) or has random weights is over 20x. Real
# LLMs have far larger vocabularies, so a collapsed one lands further above its parent.
DEFAULT_MAX_PPL_RATIO = 10.0
MAX_GATE_WINDOWS = 1024


class QualityGateSpec(StrictModel):
    """Held-out perplexity of the output against its parent's: prune measures both on
    calibration windows not used for scoring, search on its validation windows, retrain on
    the validation split (else the first training items)."""

    max_ppl_ratio: float | None = Field(
        default=DEFAULT_MAX_PPL_RATIO,
        gt=1.0,
        le=1e6,
        description="Fail (quality_gate, nothing published) when the output's held-out "
        "perplexity exceeds the parent's by more than this factor; null turns the gate off",
    )
    windows: int = Field(
        default=8,
        ge=1,
        le=MAX_GATE_WINDOWS,
        description="Held-out windows (retrain: validation items) measured on both models",
    )
