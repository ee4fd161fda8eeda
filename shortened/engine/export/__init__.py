"""Deployable outputs: a (pruned) HF checkpoint as GGUF files for llama.cpp and as quantized HF
checkpoints (compressed-tensors) for vLLM, TGI and transformers, each verified in its own
runtime. ``formats`` is the table of targets (torch-free, read by specs and admission);
``export_model`` (``recipe``) writes and verifies; ``gguf_prune.prune_gguf`` removes blocks
from a GGUF file directly. ``export_model`` is imported on first use, so reading the table
does not import torch."""

from __future__ import annotations

from typing import Any

from .errors import ExportVerificationFailed, UnsupportedExportTarget
from .formats import FORMATS, GGUF_ARCHITECTURES, ExportFormat, export_format

__all__ = [
    "FORMATS",
    "GGUF_ARCHITECTURES",
    "ExportFormat",
    "ExportVerificationFailed",
    "UnsupportedExportTarget",
    "export_format",
    "export_model",
]


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from .recipe import export_model

        return export_model
    raise AttributeError(name)
