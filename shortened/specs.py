"""Job specifications: the one definition shared by the API (validation, OpenAPI),
the worker (parsing the task payload) and the CLI.

Pure pydantic: no torch, no Celery, no FastAPI, so every layer can import it cheaply.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Criterion = Literal["ppl", "taylor", "magnitude", "block_influence", "angular", "iterative_ppl"]
CRITERIA: tuple[str, ...] = Criterion.__args__  # type: ignore[attr-defined]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]

# Schemes a model or data source may use. Local paths are plain paths (no scheme).
SOURCE_SCHEMES = ("s3://", "hf://", "job://", "file://")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


def _check_source(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if "://" in value and not value.startswith(SOURCE_SCHEMES):
        scheme = value.split("://", 1)[0]
        raise ValueError(
            f"unsupported scheme {scheme!r}; use a local path or one of {', '.join(SOURCE_SCHEMES)}"
        )
    return value


class CalibrationSpec(_Strict):
    """Where calibration text comes from and how windows are drawn from it.

    Exactly one of ``source`` (a local .txt/.jsonl/.parquet file or an object-storage URI)
    and ``dataset`` (a Hugging Face dataset name) is given.
    """

    source: str | None = Field(
        default=None, description="Local .txt/.jsonl/.parquet file, s3:// or job:// URI"
    )
    dataset: str | None = Field(default=None, description="Hugging Face dataset id, e.g. bookcorpus")
    dataset_config: str | None = Field(default=None, description="HF dataset configuration name")
    split: str = "train"
    field: str = Field(default="text", description="Text field in .jsonl/.parquet/HF records")
    n_samples: int = Field(default=10, ge=1, le=100_000)
    seq_len: int = Field(default=128, ge=2, le=131_072)
    seed: int = 1234
    add_bos_to_every: bool = Field(
        default=False, description="Prepend BOS to every window (needed for Gemma)"
    )

    @field_validator("source")
    @classmethod
    def _source_ok(cls, value: str | None) -> str | None:
        return None if value is None else _check_source(value)

    @model_validator(mode="after")
    def _one_origin(self) -> CalibrationSpec:
        if (self.source is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'source' (file or URI) and 'dataset' (HF dataset)")
        return self


class PruneSpec(_Strict):
    """One-shot depth pruning: score blocks, remove the least important, save a checkpoint."""

    model: str = Field(description="Local directory, s3://bucket/prefix/, hf://org/name[@rev] or job://<id>")
    criterion: Criterion = "ppl"
    num_blocks: int | None = Field(default=None, ge=1, description="Number of blocks to remove")
    target_ratio: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="Fraction of parameters to remove"
    )
    calibration: CalibrationSpec
    protect_first: int = Field(default=4, ge=0, description="Leading blocks never removed")
    protect_last: int = Field(default=2, ge=0, description="Trailing blocks never removed")
    score_all_blocks: bool = Field(
        default=False, description="ppl: also score protected blocks (full profile, slower)"
    )
    batch_size: int = Field(default=4, ge=1, le=1024, description="Calibration windows per forward")
    dtype: Dtype = "auto"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")

    @field_validator("model")
    @classmethod
    def _model_ok(cls, value: str) -> str:
        return _check_source(value)

    @model_validator(mode="after")
    def _one_target(self) -> PruneSpec:
        if (self.num_blocks is None) == (self.target_ratio is None):
            raise ValueError("give exactly one of 'num_blocks' and 'target_ratio'")
        return self
