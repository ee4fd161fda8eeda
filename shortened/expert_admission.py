"""Admission of a prune job's ``expert_pruning`` section from the model's ``config.json``
(torch-free): what routing-frequency expert pruning (``shortened.engine.expert_pruning``)
would refuse after loading the model and scoring its blocks, said before the job is queued.

Refused, each on the spec field it belongs to: a model without mixture-of-experts blocks
(a dense family, or an MoE family's config with no routed experts or every block dense) and a
family whose router selects experts in fixed groups (``expert_pruning``); a count that
removes no expert or keeps fewer than ``num_experts_per_tok`` (``expert_pruning.keep_experts``,
or ``expert_pruning.keep_fraction`` once rounded up). The rules are the engine's own
(``shortened.engine.families``), so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from shortened.engine.errors import UnsupportedArchitecture
from shortened.engine.families import (
    adapter_for_model_type,
    expert_keep_problem,
    expert_pruning_refusal,
    experts_kept,
    num_experts,
)
from shortened.param_estimates import text_config
from shortened.specs.pruning import ExpertPruningSpec


def expert_pruning_problems(
    section: ExpertPruningSpec | None, config: dict[str, Any]
) -> Iterator[tuple[str, str]]:
    """``(field, message)`` for every reason ``section`` cannot prune the experts of the
    model whose ``config.json`` is ``config`` (fields relative to the job's spec)."""
    if section is None:
        return
    try:
        adapter = adapter_for_model_type(config.get("model_type"))
    except UnsupportedArchitecture:
        return  # the model check reports the family
    get = adapter.lookup(text_config(config))
    refusal = expert_pruning_refusal(adapter, get)
    if refusal is not None:
        yield "expert_pruning", refusal
        return
    assert adapter.moe is not None  # a dense family is refused above
    total = num_experts(get)
    top_k = get(adapter.moe.top_k)
    keep = experts_kept(total, section.keep_experts, section.keep_fraction)
    problem = expert_keep_problem(total, top_k if isinstance(top_k, int) else None, keep)
    if problem is None:
        return
    if section.keep_experts is not None:
        yield "expert_pruning.keep_experts", problem
    else:
        yield (
            "expert_pruning.keep_fraction",
            f"{section.keep_fraction:g} of {total} experts rounds up to {keep}; {problem}",
        )
