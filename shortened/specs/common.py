"""What every job spec is built from: the strict base model, the bounds of every count a spec
may hold, the shared bounded field types, and the check of a model or data source's scheme.

Pure pydantic, no torch: every layer imports it cheaply.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["auto", "float32", "bfloat16", "float16"]

# Schemes a model or data source may use. Local paths are plain paths (no scheme).
SOURCE_SCHEMES = ("s3://", "hf://", "job://", "file://")
# Data files the engine reads (calibration, training and evaluation text).
DATA_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


# Upper bounds of every count a spec may hold. Far above anything a real run uses, they
# keep absurd values (and integers beyond 64 bits, which no database column or tensor API
# takes) out at the door, with a 422 naming the field, instead of failing deep in a job.
MAX_BLOCKS = 1024  # transformer blocks: no released LLM comes near
MAX_SEQ_LEN = 131_072
MAX_BATCH = 4096
MAX_STEPS = 100_000_000  # optimizer steps, warm-up, checkpoint/log intervals
MAX_TOKENS = 10**13  # a CPT token budget (LLaMA-3 was trained on 1.5e13)
MAX_RECORDS = 1_000_000_000
MAX_SEED = 2**32 - 1  # numpy's seed range, the narrowest of the libraries seeded
MAX_EPOCHS = 1000.0
MAX_LEARNING_RATE = 10.0
# A shard size as transformers' save_pretrained reads it: decimal KB/MB/GB, binary KiB/MiB/GiB.
SHARD_SIZE_PATTERN = r"^[1-9][0-9]{0,5}(KB|MB|GB|KiB|MiB|GiB)$"

Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description=f"Random seed, 0..{MAX_SEED}")]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Records = Annotated[int, Field(ge=1, le=MAX_RECORDS)]
LearningRate = Annotated[float, Field(gt=0.0, le=MAX_LEARNING_RATE)]

# The fields every job that loads a model has, declared once.
ModelSource = Annotated[
    str,
    Field(description="Local directory, s3://bucket/prefix/, hf://org/name[@rev] or job://<id>"),
]
WeightsDtype = Annotated[Dtype, Field(description="Weights dtype (auto: chosen for the device)")]
Device = Annotated[
    str,
    Field(
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="cpu, cuda or cuda:N (auto: CUDA when available)",
    ),
]
ShardSize = Annotated[
    str | None,
    Field(
        pattern=SHARD_SIZE_PATTERN,
        description="Largest safetensors shard of the saved model, e.g. 2GB or 500MB (default: "
        "the source checkpoint's largest shard, or 5GB for a single-file source)",
    ),
]


class StrictModel(BaseModel):
    """The base of every spec section: unknown fields are refused, never ignored."""

    # allow_inf_nan=False: NaN and +-Infinity (which Python's json reads) are never a valid
    # hyper-parameter, and JSON responses and PostgreSQL's jsonb cannot hold them.
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


def check_source(value: str) -> str:
    """A model or data source, stripped: a local path or a URI of one of ``SOURCE_SCHEMES``."""
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if "://" in value and not value.startswith(SOURCE_SCHEMES):
        scheme = value.split("://", 1)[0]
        raise ValueError(
            f"unsupported scheme {scheme!r}; use a local path or one of {', '.join(SOURCE_SCHEMES)}"
        )
    return value
