"""The quality gate of a job that publishes a model (prune, search, retrain): its output's
perplexity on held-out text is compared with its parent's, and an output worse than
``max_ppl_ratio`` times the parent's is a collapsed model, failed with ``quality_gate`` and
never published.
"""

from __future__ import annotations

from pydantic import Field

from .common import StrictModel

# A ratio only a collapsed model reaches (measurements in docs/quality-gate.md): on
# models/tiny-llama every criterion removing 2-6 of 12 blocks stays at or under 2.05x its
# parent, while random weights reach 82x (predicting no better than chance: 2048 tokens /
# parent's 26 = 79x) and two middle blocks kept alone 167x. 20x leaves a 10x margin above the
# sane prunes and sits 4x below chance on the smallest vocabulary here; real LLMs' chance level
# (32k-256k tokens over a perplexity of 5-20) is over 1000x their parent.
DEFAULT_MAX_PPL_RATIO = 20.0
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
