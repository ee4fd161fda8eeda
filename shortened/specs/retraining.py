"""The retrain job's spec: ``RetrainSpec`` (LoRA, continued pretraining, CPT followed by LoRA,
or knowledge distillation from the parent) and its sections: the training data, the LoRA
adapter, and the CPT and KD stages' budgets and hyper-parameters.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .common import (
    MAX_EPOCHS,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_TOKENS,
    Device,
    ModelSource,
    Records,
    Seed,
    ShardSize,
    Steps,
    StrictModel,
    WeightsDtype,
    check_source,
)
from .distributed import DistributedSpec
from .export import PipelineExport
from .quality_gate import QualityGateSpec
from .tracking import JobSpecBase

# Hyper-parameter bounds within which a run trains: each was measured at its extreme on
# models/tiny-llama (docs/training-bounds.md has the table and the reasons). A combination of
# in-range values that still diverges fails with non_finite or quality_gate, publishing nothing.
MAX_LORA_LEARNING_RATE = 1e-2  # adapters: 1e-2 trains, 0.1 collapses the model (139x perplexity)
MAX_FULL_LEARNING_RATE = 3e-3  # every weight (CPT, KD): 3e-3 trains, 1e-2 collapses it (27x)
MAX_WEIGHT_DECAY = 1.0  # AdamW shrinks weights by lr * weight_decay a step
MIN_KD_TEMPERATURE = 0.1  # below, the loss's T^2 factor makes it vanish (0.003 at T = 0.01)
MAX_KD_TEMPERATURE = 100.0
MAX_LORA_ALPHA = 4096  # the update is scaled by alpha / r: at most 4096 with rank 1
MAX_LORA_DROPOUT = 0.5  # kept activations are scaled by 1 / (1 - p)

LoraLearningRate = Annotated[float, Field(gt=0.0, le=MAX_LORA_LEARNING_RATE)]
FullLearningRate = Annotated[float, Field(gt=0.0, le=MAX_FULL_LEARNING_RATE)]

RetrainMethod = Literal["lora", "cpt", "cpt_lora", "kd"]
RETRAIN_METHODS: tuple[str, ...] = RetrainMethod.__args__  # type: ignore[attr-defined]
DataFormat = Literal["auto", "alpaca", "text"]

# The paper's LoRA targets: every attention and MLP projection of a LLaMA-style block.
LORA_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


class TrainDataSpec(StrictModel):
    """Training data: a local file / object-storage URI, or a Hugging Face dataset.

    ``alpaca`` records have ``instruction``, ``input`` (may be empty) and ``output`` fields and
    are rendered with the Alpaca prompt template; ``text`` records are raw text in ``field``
    (.txt files: blank-line separated documents). ``auto`` picks alpaca when the first record
    has ``instruction`` and ``output``. With ``chat_template`` every record is rendered as a
    chat by the model's template instead (``messages`` records too; the loss of supervised
    examples on the assistant's last answer unless ``train_on_inputs``). Validation data is
    a held-out fraction, a held-out number of records, or a separate file -- at most one of
    the three.
    """

    source: str | None = Field(
        default=None, description="Local .txt/.jsonl/.json/.parquet file, s3:// or job:// URI"
    )
    dataset: str | None = Field(
        default=None, description="Hugging Face dataset id, e.g. yahma/alpaca-cleaned"
    )
    dataset_config: str | None = Field(default=None, description="HF dataset configuration name")
    split: str = "train"
    streaming: bool = Field(
        default=False, description="Stream the HF dataset (large corpora); needs a step budget"
    )
    format: DataFormat = "auto"
    field: str = Field(default="text", description="Text field of text-format records")
    train_on_inputs: bool = Field(
        default=False, description="Alpaca and chats: also compute the loss on the prompt"
    )
    chat_template: bool = Field(
        default=False,
        description="Render records through the model's chat template (instruct models): "
        "'messages' lists, Alpaca records as user/assistant turns, text as one user turn",
    )
    max_records: Records | None = Field(
        default=None, description="Use at most this many training records"
    )
    validation_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Held-out fraction of the records"
    )
    validation_size: Records | None = Field(default=None, description="Held-out number of records")
    validation_source: str | None = Field(
        default=None, description="Separate validation file or URI"
    )

    @field_validator("source", "validation_source")
    @classmethod
    def _source_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_source(value)

    @model_validator(mode="after")
    def _consistent(self) -> TrainDataSpec:
        if (self.source is None) == (self.dataset is None):
            raise ValueError(
                "give exactly one of 'source' (file or URI) and 'dataset' (HF dataset)"
            )
        if self.streaming and self.dataset is None:
            raise ValueError("'streaming' applies to HF datasets ('dataset') only")
        held_out = [
            self.validation_fraction > 0,
            self.validation_size is not None,
            self.validation_source is not None,
        ]
        if sum(held_out) > 1:
            raise ValueError(
                "give at most one of 'validation_fraction', 'validation_size' and 'validation_source'"
            )
        if self.streaming and self.validation_fraction > 0:
            raise ValueError(
                "a streamed dataset has no known length: use 'validation_size' or 'validation_source'"
            )
        return self


class LoraSpec(StrictModel):
    """LoRA hyper-parameters; the defaults are the paper's (from alpaca-lora)."""

    r: int = Field(default=8, ge=1, le=4096, description="LoRA rank")
    alpha: int = Field(
        default=16, ge=1, le=MAX_LORA_ALPHA, description="LoRA scaling numerator (lora_alpha)"
    )
    dropout: float = Field(default=0.05, ge=0.0, le=MAX_LORA_DROPOUT)
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGET_MODULES),
        min_length=1,
        description="Linear layers to adapt, by name; the default means every attention and "
        "MLP projection, under the family's own names where they differ (Falcon: "
        "query_key_value, dense, dense_h_to_4h, dense_4h_to_h)",
    )
    merge: bool = Field(
        default=True, description="Also save the merged full model (merge_and_unload)"
    )


class CptSpec(StrictModel):
    """Continued pretraining: full-parameter training on packed raw text, cosine schedule.

    The budget is ``max_steps`` or ``max_tokens`` (exactly one). ``data`` defaults to the
    retrain spec's ``data`` (for ``cpt_lora`` give the corpus here and the instruction data there).
    """

    data: TrainDataSpec | None = None
    max_steps: Steps | None = Field(default=None, description="Optimizer steps")
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TOKENS,
        description="Training tokens (steps = tokens / (batch_size * seq_len))",
    )
    learning_rate: FullLearningRate = 1e-4
    warmup_steps: int = Field(default=100, ge=0, le=MAX_STEPS)
    weight_decay: float = Field(default=0.0, ge=0.0, le=MAX_WEIGHT_DECAY)
    seq_len: int | None = Field(
        default=None,
        ge=8,
        le=131_072,
        description="Packed sequence length (default: min(2048, model context))",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> CptSpec:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of 'max_steps' and 'max_tokens'")
        return self


class KdSpec(CptSpec):
    """Knowledge distillation from the unpruned parent (Minitron): the student trains on packed
    raw text towards the teacher's next-token distributions,
    ``loss = alpha * KL(teacher || student) * T^2 + (1 - alpha) * CE``, both softened by the
    temperature T. Budget, data, learning rate, warm-up and ``seq_len`` as for CPT.

    Defaults are Minitron's: pure logit distillation (alpha 1, T 1), which its ablations found
    best; the learning rate is this service's CPT default. In a pipeline (a prune spec's
    ``retrain``) the teacher defaults to the prune job's source model.
    """

    teacher: str | None = Field(
        default=None,
        description="The parent model (same tokenizer); a pipeline defaults it to the pruned model's source",
    )
    alpha: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Weight of the KD term; 1 - alpha weighs the LM loss",
    )
    temperature: float = Field(
        default=1.0,
        ge=MIN_KD_TEMPERATURE,
        le=MAX_KD_TEMPERATURE,
        description="Softmax temperature of both distributions",
    )
    lora: bool = Field(
        default=False,
        description="Train a LoRA adapter (the 'lora' section) instead of every weight",
    )
    chunk_size: int = Field(
        default=256,
        ge=1,
        le=MAX_SEQ_LEN,
        description="Token positions whose vocabulary logits are held at once",
    )

    @field_validator("teacher")
    @classmethod
    def _teacher_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_source(value)


class RetrainSpec(JobSpecBase):
    """Retrain a (pruned) model: LoRA, continued pretraining (CPT), CPT followed by LoRA, or
    knowledge distillation from the parent (KD, settings in ``kd``).

    ``learning_rate``, ``epochs``, ``cutoff_len`` and ``warmup_steps`` are the LoRA stage's
    (the paper's defaults); the CPT stage takes its own from ``cpt``. Batch sizes,
    ``max_steps``, checkpointing and logging apply to every stage.
    """

    model: ModelSource
    method: RetrainMethod = "lora"
    data: TrainDataSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    cpt: CptSpec | None = Field(
        default=None, validate_default=True, description="Required for cpt and cpt_lora"
    )
    kd: KdSpec | None = Field(default=None, description="Required for kd")
    export: PipelineExport | None = Field(
        default=None,
        description="Pipeline: export the retrained model to deployable, verified artifacts "
        "when this job succeeds (a follow-up job; in a prune pipeline, give it at the top level)",
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec,
        description="Processes and machines the training runs on (default: one process)",
    )
    learning_rate: LoraLearningRate = 1e-4
    epochs: float = Field(default=2.0, gt=0.0, le=MAX_EPOCHS)
    micro_batch_size: int = Field(default=4, ge=1, le=4096)
    batch_size: int = Field(
        default=64,
        ge=1,
        le=1_000_000,
        # The default is checked against micro_batch_size too: a spec must validate the same
        # after it is written out with its defaults (the job row, a pipeline's follow-up).
        validate_default=True,
        description="Effective batch: micro-batches x accumulation x devices",
    )
    cutoff_len: int = Field(
        default=256, ge=8, le=131_072, description="LoRA examples are truncated to this many tokens"
    )
    warmup_steps: int = Field(default=100, ge=0, le=MAX_STEPS)
    max_steps: Steps | None = Field(
        default=None, description="Cap on optimizer steps of each stage"
    )
    save_steps: Steps = Field(default=200, description="Checkpoint every N steps")
    save_total_limit: int = Field(default=2, ge=1, le=1000)
    eval_steps: Steps | None = Field(
        default=None, description="Validation loss every N steps (default: save_steps)"
    )
    logging_steps: Steps = 10
    gradient_checkpointing: bool | None = Field(
        default=None, description="Default: on for CUDA, off on CPU"
    )
    seed: Seed = 1234
    dtype: WeightsDtype = "auto"
    device: Device = "auto"
    max_shard_size: ShardSize = None
    quality_gate: QualityGateSpec = Field(
        default_factory=QualityGateSpec,
        description="Fail, publishing nothing, when the retrained model's held-out perplexity "
        "exceeds the model's before training by more than max_ppl_ratio",
    )

    @field_validator("model")
    @classmethod
    def _model_ok(cls, value: str) -> str:
        return check_source(value)

    @field_validator("cpt")
    @classmethod
    def _cpt_needed(cls, value: CptSpec | None, info: ValidationInfo) -> CptSpec | None:
        if value is None and info.data.get("method") in ("cpt", "cpt_lora"):
            raise ValueError(
                "method cpt/cpt_lora needs a budget: give cpt.max_steps or cpt.max_tokens"
            )
        return value

    @model_validator(mode="after")
    def _kd_complete(self) -> RetrainSpec:
        if self.method == "kd":
            if self.kd is None:
                raise ValueError("method kd needs a budget: give kd.max_steps or kd.max_tokens")
            self._check_teacher(self.kd)
        return self

    def _check_teacher(self, kd: KdSpec) -> None:
        if kd.teacher is None:
            raise ValueError(
                "method kd needs kd.teacher: the unpruned parent model (a prune pipeline "
                "fills it with the prune job's model)"
            )

    @field_validator("batch_size")
    @classmethod
    def _whole_accumulation(cls, value: int, info: ValidationInfo) -> int:
        micro = info.data.get("micro_batch_size")
        if micro is not None and value % micro:
            raise ValueError(f"must be a multiple of micro_batch_size ({micro})")
        return value
