"""The export targets, in one table: for each (format, type) the library that writes it, the
runtime that verifies it, and how much worse than the unquantized model its perplexity may be.

A target's ``name`` is also the name of its subdirectory in the export's output. Perplexity
tolerances are relative: an artifact passes when ``ppl <= ppl_unquantized * (1 + tolerance)``.
They are loose enough for a well-behaved model of any size (a 4-bit type loses a few percent on
a 7B model, more on a small one) and tight enough to catch a broken artifact (a wrong
tokenizer, a dropped tensor, a mis-ordered block), which shows as a perplexity many times the
original. Torch-free: the service and the CLI read it to validate a spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedExportTarget

GGUF = "gguf"
HF_QUANTIZED = "hf-quantized"

LLAMA_CPP = "llama.cpp"
TRANSFORMERS_CT = "transformers + compressed-tensors"


@dataclass(frozen=True)
class ExportFormat:
    format: str  # "gguf" | "hf-quantized"
    type: str  # a GGUF file type (llama.cpp's names) or a quantization scheme
    writer: str  # the library (and entry point) that writes it
    runtime: str  # the runtime that loads it to verify it
    ppl_tolerance: float  # relative perplexity increase allowed over the unquantized model
    description: str
    # How the writer is asked for it: the converter's --outtype, a llama.cpp ftype name for
    # llama_model_quantize, or an AutoRound preset scheme.
    writer_type: str
    calibrated: bool = False  # uses the calibration texts
    needs_fp8_gpu: bool = False  # only where a GPU computes in FP8

    @property
    def name(self) -> str:
        return f"{self.format}-{self.type}"

    @property
    def copies_source(self) -> bool:
        """``gguf-source``: the GGUF file the model was pruned from, its blocks dropped."""
        return self.writer_type == SOURCE_TYPE


_CONVERTER = "llama.cpp convert_hf_to_gguf.py"
_QUANTIZE = "llama.cpp llama_model_quantize (from f16)"
_AUTOROUND = "auto-round -> compressed-tensors"
_COPY = "gguf GGUFReader -> GGUFWriter (blocks dropped, tensors copied)"
SOURCE_TYPE = "source"  # the GGUF source's own tensors, in their own quantization

FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat(GGUF, "f16", _CONVERTER, LLAMA_CPP, 0.01, "16-bit floats", "f16"),
    ExportFormat(GGUF, "bf16", _CONVERTER, LLAMA_CPP, 0.02, "bfloat16", "bf16"),
    ExportFormat(GGUF, "q8_0", _CONVERTER, LLAMA_CPP, 0.02, "8-bit, blocks of 32", "q8_0"),
    ExportFormat(GGUF, "q6_k", _QUANTIZE, LLAMA_CPP, 0.05, "6-bit k-quant", "Q6_K"),
    ExportFormat(GGUF, "q5_k_m", _QUANTIZE, LLAMA_CPP, 0.08, "5-bit k-quant, mixed", "Q5_K_M"),
    ExportFormat(GGUF, "q4_k_m", _QUANTIZE, LLAMA_CPP, 0.15, "4-bit k-quant, mixed", "Q4_K_M"),
    # llama.cpp on the file's own quantized tensors against transformers on the same values
    # dequantized: they differ only by arithmetic.
    ExportFormat(
        GGUF,
        SOURCE_TYPE,
        _COPY,
        LLAMA_CPP,
        0.02,
        "a model pruned from a GGUF file: that file's tensors in their own quantization, the "
        "removed blocks dropped (no second quantization)",
        SOURCE_TYPE,
    ),
    ExportFormat(
        HF_QUANTIZED,
        "w4a16",
        _AUTOROUND,
        TRANSFORMERS_CT,
        0.15,
        "4-bit integer weights in groups, 16-bit activations (vLLM, TGI: compressed-tensors)",
        "W4A16",
        calibrated=True,
    ),
    ExportFormat(
        HF_QUANTIZED,
        "w8a16",
        _AUTOROUND,
        TRANSFORMERS_CT,
        0.03,
        "8-bit integer weights in groups, 16-bit activations",
        "W8A16",
        calibrated=True,
    ),
    ExportFormat(
        HF_QUANTIZED,
        "int8-w8a8",
        _AUTOROUND,
        TRANSFORMERS_CT,
        0.05,
        "8-bit integer weights per channel, activations quantized per token at run time",
        "INT8_W8A8",
        calibrated=True,
    ),
    ExportFormat(
        HF_QUANTIZED,
        "fp8",
        _AUTOROUND,
        TRANSFORMERS_CT,
        0.03,
        "FP8 (E4M3) weights and activations: only on a GPU that computes in FP8",
        "FP8_STATIC",
        calibrated=True,
        needs_fp8_gpu=True,
    ),
)
_BY_NAME = {fmt.name: fmt for fmt in FORMATS}

# The llama.cpp architecture each of our families (by config.model_type) converts to, for the
# families whose pruned checkpoints llama.cpp is tested to compute as transformers does. A
# family missing here is refused for GGUF with this table's reason, before anything is written
# (SmolLM3: llama.cpp derives its no-RoPE layers from a period that pruning breaks).
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",  # llama.cpp runs Mistral's dense models as llama
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "olmo": "olmo",
    "olmo2": "olmo2",
    "granite": "granite",
    "granitemoe": "granitemoe",
    "stablelm": "stablelm",
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "deepseek_v3": "deepseek2",
}


def export_format(target: dict[str, str] | str) -> ExportFormat:
    """The table row for ``{"format": ..., "type": ...}`` or a name like ``gguf-q4_k_m``."""
    if isinstance(target, str):
        name = target.lower()
    else:
        name = f"{str(target.get('format', '')).lower()}-{str(target.get('type', '')).lower()}"
    found = _BY_NAME.get(name)
    if found is None:
        raise UnsupportedExportTarget(
            f"unknown export target {name!r}; known: {', '.join(sorted(_BY_NAME))}"
        )
    return found


def _dense_blocks_among_experts(config: dict) -> bool:
    """Qwen-MoE's dense blocks: listed in ``mlp_only_layers`` or left by ``decoder_sparse_step``."""
    step = config.get("decoder_sparse_step") or 1
    return bool(config.get("mlp_only_layers")) or (isinstance(step, int) and step > 1)


# What a family's llama.cpp architecture cannot hold, read from config.json: (test, reason).
GGUF_CONFIG_LIMITS = {
    model_type: (
        _dense_blocks_among_experts,
        "llama.cpp's qwen2moe/qwen3moe have a mixture of experts in every block; this model "
        "has dense blocks (mlp_only_layers / decoder_sparse_step)",
    )
    for model_type in ("qwen2_moe", "qwen3_moe")
}


def gguf_architecture(model_type: str | None, config: dict | None = None) -> str:
    """The llama.cpp architecture for a family, or ``UnsupportedExportTarget`` with the reason
    (the family has none, or ``config`` is a layout its architecture cannot hold)."""
    arch = GGUF_ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise UnsupportedExportTarget(
            f"model type {model_type!r} has no llama.cpp architecture to export to GGUF; "
            f"GGUF export supports: {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    limit = GGUF_CONFIG_LIMITS.get(model_type or "")
    if limit is not None and config is not None and limit[0](config):
        raise UnsupportedExportTarget(f"cannot export to GGUF: {limit[1]}")
    return arch
