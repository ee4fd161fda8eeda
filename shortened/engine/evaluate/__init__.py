"""Evaluating a (pruned) model the way the paper does, one concern a module: ``perplexity``,
``zero_shot`` (lm-evaluation-harness), ``efficiency`` (generation timing), ``agreement``
(next-token agreement with the parent), ``compare`` (deltas
against the baseline) and ``recipe`` (``evaluate_model``: one model or two, the baseline
cache, the report). This package re-exports their public names.
"""

from __future__ import annotations

from .agreement import measure_agreement, next_token_agreement, token_agreement
from .compare import compare_results
from .efficiency import evaluate_efficiency, prompt_ids, weight_bytes
from .perplexity import (
    EvalText,
    evaluate_perplexity,
    load_eval_text,
    perplexity_windows,
    window_nll,
)
from .recipe import evaluate_loaded, evaluate_model
from .zero_shot import evaluate_zero_shot, task_manager_for

__all__ = [
    "EvalText",
    "compare_results",
    "evaluate_efficiency",
    "evaluate_loaded",
    "evaluate_model",
    "evaluate_perplexity",
    "evaluate_zero_shot",
    "load_eval_text",
    "measure_agreement",
    "next_token_agreement",
    "perplexity_windows",
    "prompt_ids",
    "task_manager_for",
    "token_agreement",
    "weight_bytes",
    "window_nll",
]
