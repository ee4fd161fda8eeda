"""Everything that differs between model families, in one place.

A family adapter says where the decoder block list and the final norm live, and which
config fields hold one entry per layer. Block selection (used both to prune for good and
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
    supported_families,
)

log = logging.getLogger(__name__)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    return adapter_for_model_type(getattr(model.config, "model_type", None))


def _config_changes(adapter: FamilyAdapter, config: Any, kept: Sequence[int]) -> dict[str, Any]:
    """New values of the per-layer config fields for a model keeping ``kept`` (original indices)."""
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
    # Safety net for per-layer lists this adapter does not know about yet: slice them too
    # (a list with one entry per layer cannot stay longer than the layer list) and say so.
    for name, values in vars(config).items():
        if name in changes or name.startswith("_") or not isinstance(values, list | tuple):
            continue
        if len(values) == num_before and num_before > 1:
            log.warning("slicing undeclared per-layer config field %s for %s", name, adapter.name)
            changes[name] = [values[i] for i in kept]
    return changes


def _apply(
    model: nn.Module,
    adapter: FamilyAdapter,
    blocks: Sequence[nn.Module],
    config_values: dict[str, Any],
) -> None:
    _set_path(model, adapter.layers_path, nn.ModuleList(blocks))
    for name, value in config_values.items():
        setattr(model.config, name, value)


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
    _apply(model, adapter, blocks, _config_changes(adapter, model.config, kept))
    _renumber(blocks)


@contextlib.contextmanager
def block_view(model: nn.Module, active: Sequence[int]) -> Iterator[None]:
    """Temporarily run the model with only the blocks in ``active`` (original indices).

    Nothing is copied: the block list and config fields are swapped and restored. Meant for
    scoring with ``use_cache=False`` (layer_idx is left as is).
    """
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    changes = _config_changes(adapter, model.config, list(active))
    saved_config = {name: getattr(model.config, name) for name in changes}
    _apply(model, adapter, [layers[i] for i in active], changes)
    try:
        yield
    finally:
        _apply(model, adapter, list(layers), saved_config)
