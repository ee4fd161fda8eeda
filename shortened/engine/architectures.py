"""Everything that differs between model families, in one place.

A family adapter says where the decoder block list and the final norm live, which config
fields hold one entry per layer and which blocks are mixture-of-experts blocks (a block is
removed whole: attention, router and every expert). A vision-language model's language
model is pruned through its text config; the vision tower and projector are not touched. Block selection (used both to prune for good and
to score with a temporary view of the model) is written once on top of that.

The family table (``families.py``) is torch-free; adding a family is one line there and one
test case.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from .errors import UnsupportedArchitecture
from .families import (  # noqa: F401  (re-exported: the family table lives there)
    FAMILIES,
    FamilyAdapter,
    _get_path,
    _set_path,
    adapter_for_model_type,
    lookup_of,
    supported_families,
)

log = logging.getLogger(__name__)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    return adapter_for_model_type(getattr(model.config, "model_type", None))


def _config_changes(adapter: FamilyAdapter, config: Any, kept: Sequence[int]) -> dict[str, Any]:
    """New values of the per-layer fields of the language model's config ``config`` for a
    model keeping ``kept`` (original indices). Raises ``UnsupportedArchitecture`` when a kept
    block would change kind (dense / mixture of experts) in the renumbered model."""
    num_before = config.num_hidden_layers
    changes: dict[str, Any] = {"num_hidden_layers": len(kept)}
    for name in adapter.per_layer_fields:
        values = getattr(config, name, None)
        if values is not None:
            if len(values) != num_before:
                raise UnsupportedArchitecture(
                    f"config.{name} has {len(values)} entries for {num_before} layers"
                )
            changes[name] = [values[i] for i in kept]
    for name in adapter.leading_count_fields:
        count = getattr(config, name, None)
        if isinstance(count, int):
            changes[name] = sum(1 for i in kept if i < count)
    for name in adapter.index_fields:
        indices = getattr(config, name, None)
        if indices is not None:
            changes[name] = [new for new, old in enumerate(kept) if old in set(indices)]
    if adapter.moe is not None and adapter.moe.sparse_step:
        # "(i + 1) % decoder_sparse_step == 0" depends on the absolute index, which removal
        # shifts: the kept blocks' kinds are written out as the explicit dense-layer list.
        get = lookup_of(config)
        changes["decoder_sparse_step"] = 1
        changes["mlp_only_layers"] = [
            new for new, old in enumerate(kept) if not adapter.is_moe_layer(get, old)
        ]
    # Safety net for per-layer lists this adapter does not know about yet: slice them too
    # (a list with one entry per layer cannot stay longer than the layer list) and say so.
    for name, values in vars(config).items():
        if name in changes or name.startswith("_") or not isinstance(values, list | tuple):
            continue
        if len(values) == num_before and num_before > 1:
            log.warning("slicing undeclared per-layer config field %s for %s", name, adapter.name)
            changes[name] = [values[i] for i in kept]
    _check_kinds(adapter, config, changes, kept)
    return changes


def _check_kinds(
    adapter: FamilyAdapter, config: Any, changes: dict[str, Any], kept: Sequence[int]
) -> None:
    """Every kept block keeps its kind (dense or MoE) at its new index under the new config:
    a dense block read as MoE (or the reverse) would not load or would compute otherwise."""
    if adapter.moe is None:
        return
    before = lookup_of(config)

    def after(name: str) -> Any:
        return changes[name] if name in changes else before(name)

    for new, old in enumerate(kept):
        if adapter.is_moe_layer(before, old) != adapter.is_moe_layer(after, new):
            raise UnsupportedArchitecture(
                f"{adapter.name}: block {old} would change between dense and mixture-of-experts "
                "at its new index (the layer pattern depends on the absolute layer index)"
            )


def _apply(
    model: nn.Module,
    adapter: FamilyAdapter,
    blocks: Sequence[nn.Module],
    config_values: dict[str, Any],
) -> None:
    _set_path(model, adapter.layers_path, nn.ModuleList(blocks))
    for config in _configs_to_update(model, adapter):
        for name, value in config_values.items():
            setattr(config, name, value)


def _configs_to_update(model: nn.Module, adapter: FamilyAdapter) -> list[Any]:
    """The language model's config, and every other config object the model holds for it
    (a vision-language model's text model may keep its own copy)."""
    configs = [adapter.text_config(model.config)]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None  # type: ignore[operator]
    inner = getattr(decoder, "config", None)
    if inner is not None and all(inner is not config for config in configs):
        configs.append(inner)
    return configs


def _renumber(blocks: Sequence[nn.Module]) -> None:
    # The KV cache is indexed by each attention module's layer_idx: after removal it must
    # match the block's new position or generate() reads another layer's cache.
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # type: ignore[assignment]  # torch/transformers stubs


def keep_blocks(model: nn.Module, kept: Sequence[int]) -> None:
    """Remove every decoder block whose original index is not in ``kept``, in place.

    Renumbers attention ``layer_idx``, updates ``num_hidden_layers`` and slices per-layer
    config fields, so the model generates with a KV cache and saves as a normal checkpoint.
    """
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    kept = sorted(kept)
    if not kept or kept[0] < 0 or kept[-1] >= len(layers) or len(set(kept)) != len(kept):
        raise ValueError(f"invalid kept blocks {kept} for {len(layers)} layers")
    blocks = [layers[i] for i in kept]
    changes = _config_changes(adapter, adapter.text_config(model.config), kept)
    _apply(model, adapter, blocks, changes)
    _renumber(blocks)


@contextlib.contextmanager
def block_view(model: nn.Module, active: Sequence[int]) -> Iterator[None]:
    """Temporarily run the model with only the blocks in ``active`` (original indices).

    Nothing is copied: the block list and config fields are swapped and restored. Meant for
    scoring with ``use_cache=False`` (layer_idx is left as is).
    """
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    text_config = adapter.text_config(model.config)
    changes = _config_changes(adapter, text_config, list(active))
    saved_config = {name: getattr(text_config, name, None) for name in changes}
    _apply(model, adapter, [layers[i] for i in active], changes)
    try:
        yield
    finally:
        _apply(model, adapter, list(layers), saved_config)
