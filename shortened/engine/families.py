"""The model families pruning supports, by ``config.model_type``: where a family keeps its
decoder blocks and final norm, and which config fields follow the block count.

Torch-free, so admission can check a checkpoint's ``config.json`` without importing torch;
``architectures.py`` does the block surgery on top of it.

Adding a family: one ``FamilyAdapter(...)`` line in ``FAMILIES`` and one test case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedArchitecture


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

    def layers(self, model: Any) -> Any:
        return _get_path(model, self.layers_path)

    def final_norm(self, model: Any) -> Any:
        return _get_path(model, self.final_norm_path)

    def num_layers(self, model: Any) -> int:
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
