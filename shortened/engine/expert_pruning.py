"""Routing-frequency expert pruning: in every mixture-of-experts block, keep the experts a
calibration set routes to most and remove the others.

The criterion is the usage-frequency one of the expert-pruning literature (the "frequency"
criterion benchmarked in MC-Suite, Jaiswal et al. 2025, "Finding Fantastic Experts in MoEs";
Lu et al. 2024, "Not All Experts are Equal", prune by a different rule, enumerating expert
subsets to minimise the block's output reconstruction loss, which is not what this does):

    f_e = sum over calibration tokens t of [e in TopK(router(x_t), k)]

and each block keeps the ``keep`` experts of largest ``f_e`` (ties: the lower index). Every
MoE block keeps the same number, because the config holds one expert count for all blocks.
The router's weight rows (and bias, and any per-expert buffer) and the stacked expert tensors
are sliced to the kept experts in their original order, so a token routed to a kept expert
computes exactly what it did; ``num_experts_per_tok`` stays as it was, so ``keep`` must be at
least that.

Families whose router returns scores only and routes in groups with a load-balancing bias
(DeepSeek-V2/V3, GLM-4.5: ``MoeLayout.grouped_routing``) are refused: their expert groups are
fixed contiguous ranges that removing experts would reshuffle. What is refused, and how many
experts a spec keeps, are the torch-free rules of ``families`` (``expert_pruning_refusal``,
``experts_kept``, ``expert_keep_problem``) that admission applies to ``config.json`` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import NothingToPrune, UnsupportedArchitecture
from .families import (
    FamilyAdapter,
    expert_keep_problem,
    expert_pruning_refusal,
    experts_kept,
)
from .moe import routing_counts


def experts_to_keep(counts: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` experts with the most top-k selections in ``counts`` (ties: the lower
    index), in ascending index order."""
    order = sorted(range(len(counts)), key=lambda e: (-int(counts[e]), e))
    return sorted(order[:keep])


def _slice_rows(module: nn.Module, kept: torch.Tensor, before: int) -> None:
    """Every parameter and buffer of ``module`` (not its children) with one row per expert,
    cut to the rows in ``kept``."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.shape and param.shape[0] == before:
            sliced = param.data.index_select(0, kept.to(param.device)).clone()
            setattr(module, name, nn.Parameter(sliced, requires_grad=param.requires_grad))
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer is not None and buffer.shape and buffer.shape[0] == before:
            module.register_buffer(name, buffer.index_select(0, kept.to(buffer.device)).clone())


def _recount(modules: Sequence[nn.Module], before: int, after: int) -> None:
    # The router, the experts and the MoE block each keep their own copy of the count
    # (one-hot sizes, the router's out_features): all must say the new one.
    for module in modules:
        for attr in ("num_experts", "out_features", "num_local_experts"):
            if getattr(module, attr, None) == before:
                setattr(module, attr, after)


def _moe_parts(block: nn.Module, adapter: FamilyAdapter) -> tuple[nn.Module, nn.Module, nn.Module]:
    moe = adapter.moe
    assert moe is not None
    router = block.get_submodule(moe.router)
    experts = block.get_submodule(moe.experts)
    return router, experts, block.get_submodule(moe.router.rsplit(".", 1)[0])


def prune_experts(
    model: nn.Module, adapter: FamilyAdapter, kept_per_block: dict[int, list[int]]
) -> None:
    """Keep only ``kept_per_block[i]`` (original expert indices) in MoE block ``i``, in
    place, and write the new expert count into the language model's config."""
    moe = adapter.moe
    if moe is None or not kept_per_block:
        raise UnsupportedArchitecture(f"{adapter.name} has no mixture-of-experts blocks")
    sizes = {len(kept) for kept in kept_per_block.values()}
    if len(sizes) != 1:
        raise ValueError(f"every MoE block must keep as many experts, got {sorted(sizes)}")
    after = sizes.pop()
    layers = adapter.layers(model)
    for index, kept in kept_per_block.items():
        router, experts, mlp = _moe_parts(layers[index], adapter)
        weight: Any = router.weight  # a router's: experts x hidden
        before = int(weight.shape[0])
        rows = torch.tensor(kept, dtype=torch.long)
        _slice_rows(router, rows, before)
        for module in experts.modules():
            _slice_rows(module, rows, before)
        _recount((router, experts, mlp), before, after)
    config = adapter.text_config(model.config)
    setattr(config, moe.expert_count, after)


def check_expert_spec(
    model: nn.Module,
    adapter: FamilyAdapter,
    keep_experts: int | None = None,
    keep_fraction: float | None = None,
) -> int:
    """How many experts each MoE block keeps; refuses (``UnsupportedArchitecture``,
    ``NothingToPrune``) what expert pruning cannot do for this model, before anything is
    removed."""
    config = adapter.text_config(model.config)
    refusal = expert_pruning_refusal(adapter, adapter.lookup(config))
    if refusal is not None:
        raise UnsupportedArchitecture(refusal)
    assert adapter.moe is not None  # a dense family is refused above
    total = int(getattr(config, adapter.moe.expert_count))
    top_k = int(getattr(config, adapter.moe.top_k))
    keep = experts_kept(total, keep_experts, keep_fraction)
    problem = expert_keep_problem(total, top_k, keep)
    if problem is not None:
        raise NothingToPrune(f"expert pruning: {problem}")
    return keep


def prune_experts_by_frequency(
    model: nn.Module,
    adapter: FamilyAdapter,
    windows: torch.Tensor,
    batch_size: int,
    keep_experts: int | None = None,
    keep_fraction: float | None = None,
) -> dict[str, Any]:
    """Count each MoE block's top-k selections on ``windows``, keep the most selected
    experts of every block and remove the rest; the report section (kept experts and
    selection counts per block, by the block's index in ``model``)."""
    keep = check_expert_spec(model, adapter, keep_experts, keep_fraction)
    config = adapter.text_config(model.config)
    total = int(getattr(config, adapter.moe.expert_count))  # type: ignore[union-attr]  # checked
    counts = routing_counts(model, adapter, windows, batch_size)
    moe_blocks = [
        i
        for i, _ in enumerate(adapter.layers(model))
        if adapter.is_moe_layer(lambda name: getattr(config, name, None), i)
    ]
    missing = [i for i in moe_blocks if i not in counts]
    if missing:
        raise UnsupportedArchitecture(
            f"{adapter.name}: the routers of blocks {missing} report no expert selection"
        )
    kept = {i: experts_to_keep(counts[i], keep) for i in moe_blocks}
    prune_experts(model, adapter, kept)
    return {
        "criterion": "routing_frequency",
        "experts_before": total,
        "experts_after": keep,
        "tokens": int(windows.numel()),
        "blocks": {str(i): {"kept": kept[i], "selections": counts[i].tolist()} for i in moe_blocks},
    }
