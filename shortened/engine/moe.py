"""Mixture-of-experts accounting on a loaded model: the parameters a token uses (the
router, shared experts and ``num_experts_per_tok`` of the routed experts of every MoE
block) and the router's expert load per block on calibration text.

Depth pruning removes an MoE block whole (attention, router and every expert); these
figures let a target count active parameters and let the report show how evenly each
block's router spread the calibration tokens over its experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .families import FamilyAdapter
from .models import count_parameters


def _part(block: nn.Module, adapter: FamilyAdapter, which: str) -> nn.Module | None:
    """The block's router or routed experts (``which``: a ``MoeLayout`` path field), or
    None for a dense family or a dense block of an MoE family."""
    if adapter.moe is None:
        return None
    try:
        return block.get_submodule(getattr(adapter.moe, which))
    except AttributeError:
        return None


def _router(block: nn.Module, adapter: FamilyAdapter) -> nn.Module | None:
    return _part(block, adapter, "router")


def inactive_params(block: nn.Module, adapter: FamilyAdapter) -> int:
    """Parameters of ``block``'s routed experts a token does not use: (experts - top_k) /
    experts of every expert tensor. 0 for a dense block."""
    router, experts = _router(block, adapter), _part(block, adapter, "experts")
    if router is None or experts is None:
        return 0
    tensors = list(experts.parameters())
    count = tensors[0].shape[0]
    top_k = min(int(getattr(router, "top_k", count)), count)
    return sum(p.numel() for p in tensors) * (count - top_k) // count


def block_param_counts(model: nn.Module, adapter: FamilyAdapter, active: bool = False) -> list[int]:
    """Every block's parameters (``active``: those a token uses), in block order."""
    return [
        count_parameters(block) - (inactive_params(block, adapter) if active else 0)
        for block in adapter.layers(model)
    ]


def count_active_parameters(model: nn.Module, adapter: FamilyAdapter) -> int:
    """The model's parameters used per token (equal to the total for a dense model)."""
    return count_parameters(model) - sum(
        inactive_params(block, adapter) for block in adapter.layers(model)
    )


@torch.no_grad()
def routing_counts(
    model: nn.Module, adapter: FamilyAdapter, windows: torch.Tensor, batch_size: int
) -> dict[int, torch.Tensor]:
    """Per MoE block (by current index), how often the router put each expert in a token's
    top-k on ``windows``: the indices the router itself returns, so the count is what the
    model computes. Blocks whose router returns scores only (DeepSeek's grouped routing)
    are left out. One text-only forward through the language model."""
    counts: dict[int, torch.Tensor] = {}
    hooks = []

    def counter(index: int):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            indices = output[-1] if isinstance(output, tuple) else None
            if indices is None or indices.is_floating_point():
                return
            weight: Any = getattr(_module, "weight")  # noqa: B009  # a router's: experts x hidden
            found = torch.bincount(indices.flatten().cpu(), minlength=int(weight.shape[0]))
            counts[index] = counts.get(index, torch.zeros_like(found)) + found

        return hook

    for index, block in enumerate(adapter.layers(model)):
        router = _router(block, adapter)
        if router is not None and isinstance(getattr(router, "weight", None), torch.Tensor):
            hooks.append(router.register_forward_hook(counter(index)))
    if not hooks or windows.numel() == 0:
        for hook in hooks:
            hook.remove()
        return counts
    device = model.get_input_embeddings().weight.device  # type: ignore[operator]  # torch/transformers stubs
    try:
        for chunk in windows.split(batch_size):
            model.get_decoder()(input_ids=chunk.to(device), use_cache=False)  # type: ignore[operator]
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def expert_load(
    model: nn.Module, adapter: FamilyAdapter, windows: torch.Tensor, batch_size: int
) -> list[dict[str, Any] | None]:
    """Per block, how the router spread the calibration tokens over its experts (None for a
    dense block): ``tokens`` routed, each expert's share of the top-k assignments
    (``load``, summing to 1), ``max_load_ratio`` (the busiest expert's share over a uniform
    share: 1 is perfectly balanced) and ``unused_experts``."""
    counts = routing_counts(model, adapter, windows, batch_size)
    return [
        _load_summary(counts.get(index), windows.numel())
        for index in range(adapter.num_layers(model))
    ]


def _load_summary(assigned: torch.Tensor | None, tokens: int) -> dict[str, Any] | None:
    if assigned is None:
        return None
    total = int(assigned.sum())
    share = (assigned.double() / max(total, 1)).tolist()
    return {
        "tokens": tokens,
        "load": [round(value, 6) for value in share],
        "max_load_ratio": round(max(share) * len(share), 4),
        "unused_experts": int((assigned == 0).sum()),
    }


def ratio_basis(model: nn.Module, adapter: FamilyAdapter, ratio_of: str) -> tuple[int, list[int]]:
    """What a ``target_ratio`` is a fraction of: the model's parameters and every block's,
    all of them (``ratio_of`` "total") or those a token uses ("active")."""
    active = ratio_of == "active"
    whole = count_active_parameters(model, adapter) if active else count_parameters(model)
    return whole, block_param_counts(model, adapter, active)


def before_removal(
    model: nn.Module, adapter: FamilyAdapter, windows: torch.Tensor, batch_size: int
) -> dict[str, Any]:
    """What the report needs from the unpruned model: its active parameters and, for an
    MoE model given calibration text, each block's expert load (by original index)."""
    loads = expert_load(model, adapter, windows, batch_size) if adapter.moe else []
    return {
        "active_params_before": count_active_parameters(model, adapter),
        "expert_load": loads if any(load is not None for load in loads) else None,
    }


def report_fields(
    model: nn.Module, adapter: FamilyAdapter, ratio_of: str, before: dict[str, Any]
) -> dict[str, Any]:
    """The report's parameter accounting beside ``params_before``/``params_after``:
    ``ratio_of``, the active parameters before and after, and the expert load per block
    (None for a dense model or without calibration text)."""
    active_after = count_active_parameters(model, adapter)
    return {
        "ratio_of": ratio_of,
        "active_params_before": before["active_params_before"],
        "active_params_after": active_after,
        "active_params_removed_ratio": round(1 - active_after / before["active_params_before"], 6),
        "expert_load": before["expert_load"],
    }
