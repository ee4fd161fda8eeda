"""The eval job's spec: ``EvalSpec`` and its sections (perplexity with the paper's protocol,
zero-shot accuracy through lm-evaluation-harness, generation efficiency, next-token agreement
with the parent), with the paper's task metrics and the named perplexity sets.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from .common import (
    MAX_BATCH,
    MAX_RECORDS,
    MAX_SEQ_LEN,
    Device,
    ModelSource,
    Records,
    Seed,
    StrictModel,
    WeightsDtype,
    check_source,
)
from .tracking import JobSpecBase

# The paper's zero-shot suite, and the metric it reports for each task (shortened-llm's
# convert_json2csv_zeroshot): acc_norm for HellaSwag, ARC-challenge and OpenBookQA, acc otherwise.
PAPER_TASK_METRICS: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}
PERPLEXITY_SETS: tuple[str, ...] = ("wikitext2", "ptb")


# Named perplexity sets as the paper loads them (dataset, config, split, text field).
# PTB is evaluated on its validation split in the paper's code (dataset.py: get_ptb).
NAMED_TEXTS: dict[str, tuple[str, str, str, str]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "validation", "sentence"),
}


class PerplexitySpec(StrictModel):
    """Perplexity with the paper's protocol: the text is concatenated and cut into
    non-overlapping windows of ``seq_len`` tokens; BOS once at the start, or on every window."""

    datasets: list[str] = Field(
        default_factory=lambda: list(PERPLEXITY_SETS),
        min_length=1,
        description="Named sets (wikitext2, ptb) or .txt/.jsonl/.parquet files / s3:// or job:// URIs",
    )
    seq_len: int = Field(default=128, ge=2, le=131_072)
    bos_every_window: bool = Field(
        default=False, description="BOS before every window (Gemma) instead of once"
    )
    field: str = Field(default="text", description="Text field of .jsonl/.parquet files")
    batch_size: int = Field(default=4, ge=1, le=4096)
    max_windows: Records | None = Field(
        default=None, description="Evaluate only the first N windows"
    )

    @field_validator("datasets")
    @classmethod
    def _sources_ok(cls, values: list[str]) -> list[str]:
        return [check_source(v) for v in values]


class ZeroShotSpec(StrictModel):
    """Zero-shot accuracy through lm-evaluation-harness (the paper's seven tasks by default)."""

    tasks: list[str] = Field(default_factory=lambda: list(PAPER_TASK_METRICS), min_length=1)
    task_include_path: str | None = Field(
        default=None, description="Directory of custom lm-eval task YAMLs"
    )
    limit: float | None = Field(
        default=None,
        gt=0,
        le=MAX_RECORDS,
        description="Examples per task (<1: a fraction); for testing only",
    )
    num_fewshot: int = Field(default=0, ge=0, le=64)
    batch_size: int = Field(default=8, ge=1, le=4096)

    @field_validator("tasks")
    @classmethod
    def _names_ok(cls, values: list[str]) -> list[str]:
        names = [v.strip() for v in values]
        if any(not n for n in names):
            raise ValueError("task names must not be empty")
        return names


class EfficiencySpec(StrictModel):
    """Generation latency/throughput as the paper's timing script: warm-up runs, timed repeats,
    output length forced (min_new_tokens = max_new_tokens), sampling with top-k 50 / top-p 0.95."""

    # Items bounded above here, below by _positive (one error naming the list).
    batch_sizes: list[Annotated[int, Field(le=MAX_BATCH)]] = Field(
        default_factory=lambda: [1], min_length=1, max_length=64
    )
    output_lengths: list[Annotated[int, Field(le=MAX_SEQ_LEN)]] = Field(
        default_factory=lambda: [128], min_length=1, max_length=64
    )
    input_length: int | None = Field(
        default=None,
        ge=1,
        le=131_072,
        description="Prompt tokens (default: the paper's prompt as is)",
    )
    prompt: str = "The Leaning Tower of Pisa is known for"
    repeats: int = Field(default=20, ge=1, le=10_000, description="Timed runs per configuration")
    warmup: int = Field(default=10, ge=0, le=10_000, description="Untimed runs first")
    do_sample: bool = True
    seed: Seed = 1234

    @field_validator("batch_sizes", "output_lengths")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError("must all be >= 1")
        return values


class AgreementSpec(StrictModel):
    """Next-token agreement of the model with its parent (``compare_with``) on held-out
    prompts: top-1 agreement and mean KL(parent || model) of the next-token distributions at
    every position of every prompt.

    A prompt is a record of ``prompts`` without its answer: with ``chat_template`` (the
    default) the conversation up to its last non-assistant turn (``messages`` records; Alpaca
    records' instruction and input; text as one user turn) rendered by the model's chat
    template with the generation prompt, so the last position predicts the answer's first
    token; without it, Alpaca records' prompt or the text as is, with the tokenizer's
    special tokens."""

    prompts: str = Field(
        description="Prompt records: a .jsonl/.json/.parquet/.txt file, s3:// or job:// URI"
    )
    field: str = Field(default="text", description="Text field of text records")
    max_prompts: Records = Field(default=64, description="Use the first N prompts")
    max_tokens: int = Field(
        default=512, ge=2, le=MAX_SEQ_LEN, description="Prompts are cut to their first N tokens"
    )
    chat_template: bool = Field(
        default=True, description="Render prompts through the model's chat template"
    )
    batch_size: int = Field(default=4, ge=1, le=MAX_BATCH)

    @field_validator("prompts")
    @classmethod
    def _prompts_ok(cls, value: str) -> str:
        return check_source(value)


class EvalSpec(JobSpecBase):
    """Evaluate a model (and optionally its parent, with deltas): perplexity, zero-shot
    accuracy, efficiency. At least one section is given."""

    model: ModelSource
    compare_with: str | None = Field(
        default=None, description="Baseline (e.g. the unpruned parent) evaluated the same way"
    )
    perplexity: PerplexitySpec | None = None
    zero_shot: ZeroShotSpec | None = None
    efficiency: EfficiencySpec | None = None
    agreement: AgreementSpec | None = Field(
        default=None,
        description="Next-token agreement with compare_with on held-out prompts (needs compare_with)",
    )
    dtype: WeightsDtype = "auto"
    device: Device = "auto"

    @field_validator("model", "compare_with")
    @classmethod
    def _source_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_source(value)

    @model_validator(mode="after")
    def _something_to_do(self) -> EvalSpec:
        sections = (self.perplexity, self.zero_shot, self.efficiency, self.agreement)
        if all(section is None for section in sections):
            raise ValueError(
                "give at least one of 'perplexity', 'zero_shot', 'efficiency' and 'agreement'"
            )
        if self.agreement is not None:
            self._check_parent()
        return self

    def _check_parent(self) -> None:
        if self.compare_with is None:
            raise ValueError("'agreement' compares the model with its parent: give 'compare_with'")
