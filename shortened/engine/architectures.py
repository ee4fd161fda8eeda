"""Everything that differs between model families, in one place.

A family adapter says where the decoder block list and the final norm live, and which
config fields hold one entry per layer. Block selection (used both to prune for good and
to score with a temporary view of the model) is written once on top of that.

Adding a family: one ``FamilyAdapter(...)`` line in ``FAMILIES`` and one test case.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import UnsupportedArchitecture

log = logging.getLogger(__name__)


def _get_path(root: Any, dotted: str) -> Any:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(root: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    setattr(_get_path(root, ".".join(parents)) if parents else root, last, value)


@dataclass(frozen=True)
class FamilyAdapter:
    name: str  # human name used in error messages
    model_types: tuple[str, ...]  # config.model_type values this adapter handles
    layers_path: str = "model.layers"
    final_norm_path: str = "model.norm"
    # Config fields with one entry per decoder layer: sliced to the kept blocks, never re-derived.
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    # Integer config fields that count leading layers (Qwen's max_window_layers): recounted over kept blocks.
    leading_count_fields: tuple[str, ...] = field(default=())

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get_path(model, self.layers_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return _get_path(model, self.final_norm_path)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))


FAMILIES: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("Llama (1/2/3, Vicuna)", ("llama",)),
    FamilyAdapter("Mistral", ("mistral",)),
    FamilyAdapter("Qwen2 / Qwen2.5", ("qwen2",), leading_count_fields=("max_window_layers",)),
    FamilyAdapter("Qwen3", ("qwen3",), leading_count_fields=("max_window_layers",)),
    FamilyAdapter("Gemma", ("gemma",)),
    FamilyAdapter("Gemma2", ("gemma2",)),
    FamilyAdapter("Gemma3 (text)", ("gemma3_text",)),
    FamilyAdapter("Phi-3", ("phi3",)),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def supported_families() -> str:
    return ", ".join(family.name for family in FAMILIES)


def adapter_for_model_type(model_type: str | None) -> FamilyAdapter:
    """The adapter for a config's ``model_type``, or ``UnsupportedArchitecture``."""
    family = _BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        hint = (
            " (load the text-only Gemma3ForCausalLM checkpoint)" if model_type == "gemma3" else ""
        )
        raise UnsupportedArchitecture(
            f"model type {model_type!r} is not supported{hint}; supported families: {supported_families()}"
        )
    return family


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
