"""An export job: a (pruned) checkpoint turned into the artifacts teams serve — GGUF files for
llama.cpp and Ollama, quantized HF checkpoints for vLLM and TGI — each verified in its own
runtime (perplexity against the unquantized model and the parent, tokens/s, size) before
anything is published. The targets are rows of the engine's format table
(``shortened.engine.export.formats``, torch-free), checked here so that an unknown target is a
422 naming it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shortened.engine.export.errors import UnsupportedExportTarget
from shortened.engine.export.formats import FORMATS, export_format

from .calibration import CalibrationSpec
from .common import ModelSource, StrictModel, check_source
from .evaluation import PerplexitySpec
from .tracking import JobSpecBase

MAX_TARGETS = 16
ExportFormatName = Literal["gguf", "hf-quantized"]


class ExportTargetSpec(StrictModel):
    """One artifact to make: a GGUF file type (``f16``, ``q8_0``, ``q4_k_m``, ...) or an
    HF-quantized scheme (``w4a16``, ``w8a16``, ``int8-w8a8``, ``fp8`` on FP8 GPUs)."""

    format: ExportFormatName
    type: str = Field(
        min_length=1,
        max_length=32,
        description="The GGUF file type or the quantization scheme: "
        + ", ".join(f"{f.format}:{f.type}" for f in FORMATS),
    )
    method: Literal["autoround"] | None = Field(
        default=None,
        description="hf-quantized: the calibrated quantizer (AutoRound, written in the "
        "compressed-tensors format vLLM and TGI load); see docs/export.md",
    )
    ppl_tolerance: float | None = Field(
        default=None,
        gt=0.0,
        le=10.0,
        description="Relative perplexity increase allowed over the unquantized model (default: "
        "the format table's, e.g. 0.15 for q4_k_m)",
    )

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, value: Any) -> Any:
        if value is not None and value != "autoround":
            raise ValueError(
                f"method {value!r} is not offered: hf-quantized targets are made with AutoRound "
                "(its SignRound calibration), written in the compressed-tensors format "
                "vLLM and TGI load; give 'autoround' or leave it out (docs/export.md says why)"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _scheme_is_type(cls, data: Any) -> Any:
        # "gguf:q4_k_m" (the CLI's form) is the object it names.
        if isinstance(data, str):
            data = parse_target(data)
        # {"format": "hf-quantized", "scheme": "w4a16"}: the scheme is the type.
        if isinstance(data, dict) and "scheme" in data and "type" not in data:
            data = {**data, "type": data["scheme"]}
            data.pop("scheme")
        return data

    @model_validator(mode="after")
    def _known(self) -> ExportTargetSpec:
        try:
            export_format({"format": self.format, "type": self.type})
        except UnsupportedExportTarget as exc:
            raise ValueError(str(exc)) from None
        if self.method is not None and self.format != "hf-quantized":
            raise ValueError("'method' applies to hf-quantized targets only")
        return self

    @property
    def name(self) -> str:
        return export_format({"format": self.format, "type": self.type}).name

    @property
    def copies_source(self) -> bool:
        return export_format(self.name).copies_source


class QuantizationSpec(StrictModel):
    """How the calibrated HF-quantized schemes are made (AutoRound's SignRound): more steps
    and samples cost time and give a lower quantization error."""

    iters: int = Field(
        default=200, ge=0, le=2000, description="SignRound steps per block (0: round to nearest)"
    )
    n_samples: int = Field(default=128, ge=1, le=2048, description="Calibration windows")
    seq_len: int = Field(default=512, ge=16, le=8192, description="Tokens per window")
    batch_size: int = Field(default=8, ge=1, le=256, description="Windows per step")


def parse_target(value: str) -> dict[str, str]:
    """``gguf:q4_k_m`` (the CLI's form) as a target object."""
    format_, sep, type_ = value.partition(":")
    if not sep:
        raise ValueError(f"{value!r}: give FORMAT:TYPE, e.g. gguf:q4_k_m or hf-quantized:w4a16")
    return {"format": format_, "type": type_}


class ExportSpec(JobSpecBase):
    """Export ``model`` to every target, each verified in its runtime; ``compare_with`` (the
    unpruned parent) is measured in the same runtime and type for the speed-up."""

    model: ModelSource
    targets: list[ExportTargetSpec] = Field(min_length=1, max_length=MAX_TARGETS)
    calibration: CalibrationSpec | None = Field(
        default=None, description="Calibration text of the calibrated schemes (w4a16, ...)"
    )
    quantization: QuantizationSpec = Field(
        default_factory=QuantizationSpec,
        description="AutoRound's settings for the calibrated schemes (w4a16, w8a16, int8-w8a8, "
        "fp8)",
    )
    perplexity: PerplexitySpec | None = Field(
        default=None,
        description="Texts every artifact's perplexity is measured on (the windows of "
        "`shortened eval`); without it only loading and speed are checked",
    )
    compare_with: str | None = Field(
        default=None, description="The unpruned parent, measured beside each artifact"
    )

    @field_validator("compare_with")
    @classmethod
    def _source_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_source(value)

    @field_validator("targets")
    @classmethod
    def _distinct(cls, targets: list[ExportTargetSpec]) -> list[ExportTargetSpec]:
        names = [target.name for target in targets]
        if len(set(names)) != len(names):
            raise ValueError("each target at most once")
        return targets

    @model_validator(mode="after")
    def _calibrated_targets_have_data(self) -> ExportSpec:
        calibrated = [t.name for t in self.targets if export_format(t.name).calibrated]
        if calibrated and self.calibration is None:
            raise ValueError(f"{', '.join(calibrated)} need calibration data: give 'calibration'")
        return self


class PipelineExport(ExportSpec):
    """An ExportSpec without ``model``: the pipeline's newest model is exported.
    ``compare_with`` defaults to the pipeline's unpruned source."""

    model: None = Field(default=None, exclude=True, description="Not given: the pipeline's model")  # type: ignore[assignment]

    @field_validator("model")
    @classmethod
    def _model_ok(cls, value: None) -> None:
        return value

    def for_model(self, model: str, compare_with: str | None) -> ExportSpec:
        data = {**self.model_dump(mode="json"), "model": model}
        if data.get("compare_with") is None:
            data["compare_with"] = compare_with
        return ExportSpec.model_validate(data)
