"""The calibration section of a prune or search spec: where the calibration text comes from
and how the windows that score the blocks are drawn from it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .common import Seed, StrictModel, check_source

Sampling = Literal["paper", "shuffle"]


class CalibrationSpec(StrictModel):
    """Where calibration text comes from and how windows are drawn from it.

    Exactly one of ``source`` (a local .txt/.jsonl/.parquet file or an object-storage URI)
    and ``dataset`` (a Hugging Face dataset name) is given.

    ``sampling: "paper"`` draws the windows exactly as the paper's code (shortened-llm
    ``get_examples``): seeded random document indices until one is long enough (with the
    tokenizer's special tokens) and unused, then a random window start. ``"shuffle"`` is the
    earlier scheme of this service: documents in a seeded shuffled order, the first
    long-enough ones taken, tokenized without special tokens.

    With ``chat_template`` each record is first rendered as a chat by the model's template
    (``shortened.engine.chat``) and the rendering, which carries its own special tokens, is
    tokenized without the tokenizer's; the draw itself is unchanged.
    """

    source: str | None = Field(
        default=None, description="Local .txt/.jsonl/.parquet file, s3:// or job:// URI"
    )
    dataset: str | None = Field(
        default=None, description="Hugging Face dataset id, e.g. bookcorpus"
    )
    dataset_config: str | None = Field(default=None, description="HF dataset configuration name")
    split: str = Field(default="train", description="HF dataset split")
    field: str = Field(default="text", description="Text field in .jsonl/.parquet/HF records")
    n_samples: int = Field(default=10, ge=1, le=100_000, description="Calibration windows")
    seq_len: int = Field(default=128, ge=2, le=131_072, description="Tokens per window")
    seed: Seed = Field(default=1234, description="Seed of the window sampling")
    add_bos_to_every: bool = Field(
        default=False, description="Prepend BOS to every window (needed for Gemma)"
    )
    sampling: Sampling = Field(
        default="paper",
        description="paper: the paper's draw, token for token; shuffle: this service's earlier scheme",
    )
    chat_template: bool = Field(
        default=False,
        description="Render each record through the model's chat template first (instruct "
        "models; records with 'messages', Alpaca fields, or text as one user turn)",
    )

    @field_validator("source")
    @classmethod
    def _source_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_source(value)

    @model_validator(mode="after")
    def _one_origin(self) -> CalibrationSpec:
        if (self.source is None) == (self.dataset is None):
            raise ValueError(
                "give exactly one of 'source' (file or URI) and 'dataset' (HF dataset)"
            )
        return self
