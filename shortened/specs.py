"""Job specifications: the one definition shared by the API (validation, OpenAPI),
the worker (parsing the task payload) and the CLI.

Pure pydantic: no torch, no Celery, no FastAPI, so every layer can import it cheaply.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Criterion = Literal["ppl", "taylor", "magnitude", "block_influence", "angular", "iterative_ppl"]
CRITERIA: tuple[str, ...] = Criterion.__args__  # type: ignore[attr-defined]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Sampling = Literal["paper", "shuffle"]
# Criteria that score blocks from the weights alone and so need no calibration data.
DATA_FREE_CRITERIA: tuple[str, ...] = ("magnitude",)

# Schemes a model or data source may use. Local paths are plain paths (no scheme).
SOURCE_SCHEMES = ("s3://", "hf://", "job://", "file://")


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


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN and +-Infinity (which Python's json reads) are never a valid
    # hyper-parameter, and JSON responses and PostgreSQL's jsonb cannot hold them.
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


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


# --- Webhooks ---------------------------------------------------------------------

WebhookEventType = Literal[
    "job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled", "job.requeued"
]
WEBHOOK_EVENT_TYPES: tuple[str, ...] = WebhookEventType.__args__  # type: ignore[attr-defined]


def check_webhook_url(value: str) -> str:
    """A callback URL's syntax: http(s), a host, no user:password (the spec is readable
    through the API). Whether the host may be reached is the server's call (private
    targets), checked at submission and again at every send."""
    from urllib.parse import urlsplit

    value = value.strip()
    if len(value) > 2048:
        raise ValueError("at most 2048 characters")
    if any(ord(c) < 33 or ord(c) == 127 for c in value):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials (user:password@)")
    if parts.fragment:
        raise ValueError("must not contain a #fragment")
    return value


class WebhookSpec(_Strict):
    """A per-job callback: ``url`` is POSTed the job's state changes, signed the Standard
    Webhooks way with the tenant's signing secret (``POST /webhooks/signing-secret``)."""

    url: str = Field(description="http(s) URL notified of this job's state changes")
    event_types: list[WebhookEventType] | None = Field(
        default=None, min_length=1, description="Only these events (default: all)"
    )

    @field_validator("url")
    @classmethod
    def _url_ok(cls, value: str) -> str:
        return check_webhook_url(value)


# --- Experiment tracking --------------------------------------------------------------

# MLflow's own limits: experiment names up to 500 characters, registered model names 256;
# narrower here, and printable, since both show up in other teams' UIs and URLs.
MLFLOW_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.:/@+-]{0,199}$"


class MlflowTrackingSpec(_Strict):
    """Where this job's MLflow run goes. The worker calls the tracking server, so a URI of
    the spec's own is accepted only when the server allows it (``SHORTENED_MLFLOW_*``):
    a tenant never points the worker at an arbitrary host."""

    tracking_uri: str | None = Field(
        default=None,
        description="http(s) URL of the MLflow tracking server (default: the server's "
        "SHORTENED_MLFLOW_TRACKING_URI); must be one the server allows",
    )
    experiment: str = Field(
        pattern=MLFLOW_NAME_PATTERN, description="MLflow experiment name (created if missing)"
    )
    register_as: str | None = Field(
        default=None,
        pattern=MLFLOW_NAME_PATTERN,
        description="prune/retrain: register the output model under this registered-model name",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _uri_ok(cls, value: str | None) -> str | None:
        # The same syntax rules as a webhook URL: http(s), a host, no credentials.
        return None if value is None else check_webhook_url(value).rstrip("/")


class TrackingSpec(_Strict):
    """Experiment trackers this job reports to (pipeline follow-ups inherit it)."""

    mlflow: MlflowTrackingSpec | None = None


class _JobSpec(_Strict):
    """What every job kind's spec has."""

    webhook: WebhookSpec | None = Field(
        default=None,
        description="Callback URL for this job's state changes (pipeline follow-ups inherit it)",
    )
    tracking: TrackingSpec | None = Field(
        default=None,
        description="Log this job as an MLflow run (pipeline follow-ups inherit it)",
    )


class CalibrationSpec(_Strict):
    """Where calibration text comes from and how windows are drawn from it.

    Exactly one of ``source`` (a local .txt/.jsonl/.parquet file or an object-storage URI)
    and ``dataset`` (a Hugging Face dataset name) is given.

    ``sampling: "paper"`` draws the windows exactly as the paper's code (shortened-llm
    ``get_examples``): seeded random document indices until one is long enough (with the
    tokenizer's special tokens) and unused, then a random window start. ``"shuffle"`` is the
    earlier scheme of this service: documents in a seeded shuffled order, the first
    long-enough ones taken, tokenized without special tokens.
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

    @field_validator("source")
    @classmethod
    def _source_ok(cls, value: str | None) -> str | None:
        return None if value is None else _check_source(value)

    @model_validator(mode="after")
    def _one_origin(self) -> CalibrationSpec:
        if (self.source is None) == (self.dataset is None):
            raise ValueError(
                "give exactly one of 'source' (file or URI) and 'dataset' (HF dataset)"
            )
        return self


class _PruningJob(_JobSpec):
    """What a prune and a search job share: the model, which blocks are off limits, how
    scoring runs, and the optional pipeline that continues with the pruned model."""

    model: str = Field(
        description="Local directory, s3://bucket/prefix/, hf://org/name[@rev] or job://<id>"
    )
    protect_first: int = Field(
        default=4, ge=0, le=MAX_BLOCKS, description="Leading blocks never removed"
    )
    protect_last: int = Field(
        default=2, ge=0, le=MAX_BLOCKS, description="Trailing blocks never removed"
    )
    batch_size: int = Field(default=4, ge=1, le=1024, description="Calibration windows per forward")
    taylor_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="taylor: windows per loss (the paper's --batch_size; default all n_samples at "
        "once, as its code). Forwards still take batch_size windows; the gradient is exact.",
    )
    dtype: Dtype = Field(default="auto", description="Weights dtype (auto: chosen for the device)")
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="cpu, cuda or cuda:N (auto: CUDA when available)",
    )
    max_shard_size: str | None = Field(
        default=None,
        pattern=SHARD_SIZE_PATTERN,
        description="Largest safetensors shard of the saved model, e.g. 2GB or 500MB (default: "
        "the source checkpoint's largest shard, or 5GB for a single-file source)",
    )
    retrain: PipelineRetrain | None = Field(
        default=None,
        description="Pipeline: retrain the pruned model when this job succeeds (a follow-up job)",
    )
    eval: PipelineEval | None = Field(
        default=None,
        description="Pipeline: evaluate the pruned (or, with 'retrain', the retrained) model",
    )

    @field_validator("model")
    @classmethod
    def _model_ok(cls, value: str) -> str:
        return _check_source(value)


class PruneSpec(_PruningJob):
    """One-shot depth pruning: score blocks, remove the least important, save a checkpoint."""

    criterion: Criterion = Field(default="ppl", description="Block-importance criterion")
    num_blocks: int | None = Field(
        default=None, ge=1, le=MAX_BLOCKS, description="Number of blocks to remove"
    )
    target_ratio: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="Fraction of parameters to remove"
    )
    calibration: CalibrationSpec | None = Field(
        default=None, description="Calibration text; required by every criterion but magnitude"
    )
    score_all_blocks: bool = Field(
        default=False, description="ppl: also score protected blocks (full profile, slower)"
    )

    @model_validator(mode="after")
    def _one_target(self) -> PruneSpec:
        if (self.num_blocks is None) == (self.target_ratio is None):
            raise ValueError("give exactly one of 'num_blocks' and 'target_ratio'")
        if self.calibration is None and self.criterion not in DATA_FREE_CRITERIA:
            raise ValueError(calibration_needed(self.criterion))
        return self


# --- Search -----------------------------------------------------------------------

# Criteria that score every block once; a search tries these unless told otherwise
# (iterative_ppl re-scores after every removal, L times the cost of ppl).
ONE_SHOT_CRITERIA: tuple[str, ...] = ("ppl", "taylor", "magnitude", "block_influence", "angular")
MAX_SPEEDUP = float(MAX_BLOCKS)  # L / (L - k) never exceeds the layer count


class BlockRange(_Strict):
    """Block counts ``min``..``max`` (both included)."""

    min: int = Field(ge=1, le=MAX_BLOCKS, description="Fewest blocks to remove")
    max: int = Field(ge=1, le=MAX_BLOCKS, description="Most blocks to remove")

    @model_validator(mode="after")
    def _ordered(self) -> BlockRange:
        if self.min > self.max:
            raise ValueError(f"'min' ({self.min}) must not exceed 'max' ({self.max})")
        return self


class SearchValidationSpec(_Strict):
    """The held-out part of the calibration data that ranks the candidates.

    The calibration *documents* are split before any window is drawn: a seeded shuffle of
    the document indices, the first ``fraction`` of them (at least one) held out. Scoring
    windows are drawn from the rest as ``calibration`` says; validation windows are the
    held-out documents concatenated and cut into non-overlapping ``calibration.seq_len``
    windows (the perplexity protocol), the first ``max_windows`` of them."""

    fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Share of the documents held out for validation"
    )
    seed: Seed = Field(default=0, description="Seed of the document split")
    max_windows: int = Field(
        default=16, ge=1, le=100_000, description="Validation windows per candidate"
    )


class SearchSpec(_PruningJob):
    """Choose the pruning for a budget: score the blocks with each criterion, evaluate every
    candidate removal within the budget on held-out data, prune with the best.

    The budget is exactly one of: ``target_ratio`` (the block count prune would choose for
    it: the search picks the criterion), ``num_blocks`` (a range of counts), ``min_speedup``
    (every count whose ideal depth speed-up L / (L - k) reaches it)."""

    criteria: list[Criterion] = Field(
        default_factory=lambda: list(ONE_SHOT_CRITERIA),  # type: ignore[arg-type]  # names checked against Criterion by a test
        min_length=1,
        max_length=len(CRITERIA),
        description="Criteria to try (default: every one-shot criterion)",
    )
    target_ratio: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="Fraction of parameters to remove"
    )
    num_blocks: BlockRange | None = Field(
        default=None, description="Range of block counts to remove"
    )
    min_speedup: float | None = Field(
        default=None,
        gt=1.0,
        le=MAX_SPEEDUP,
        description="Least estimated speed-up L / (L - k), L blocks before, k removed",
    )
    calibration: CalibrationSpec = Field(
        description="Calibration text, split into scoring and validation documents"
    )
    validation: SearchValidationSpec = Field(
        default_factory=SearchValidationSpec, description="The held-out validation part"
    )

    @field_validator("criteria")
    @classmethod
    def _distinct(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("each criterion at most once")
        return values

    @model_validator(mode="after")
    def _one_budget(self) -> SearchSpec:
        given = [self.target_ratio, self.num_blocks, self.min_speedup]
        if sum(value is not None for value in given) != 1:
            raise ValueError("give exactly one of 'target_ratio', 'num_blocks' and 'min_speedup'")
        return self


def calibration_needed(criterion: str) -> str:
    """Why a criterion cannot run without calibration data (API and CLI message)."""
    return (
        f"criterion {criterion!r} needs calibration data: it scores blocks from the model's "
        "outputs (perplexity, gradients or hidden states) on calibration text; give 'calibration' "
        f"with a 'source' or 'dataset' (only {', '.join(DATA_FREE_CRITERIA)} needs no data)"
    )


# --- Retraining -------------------------------------------------------------------

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


class TrainDataSpec(_Strict):
    """Training data: a local file / object-storage URI, or a Hugging Face dataset.

    ``alpaca`` records have ``instruction``, ``input`` (may be empty) and ``output`` fields and
    are rendered with the Alpaca prompt template; ``text`` records are raw text in ``field``
    (.txt files: blank-line separated documents). ``auto`` picks alpaca when the first record
    has ``instruction`` and ``output``. Validation data is a held-out fraction, a held-out
    number of records, or a separate file -- at most one of the three.
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
        default=False, description="Alpaca: also compute the loss on the prompt"
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
        return None if value is None else _check_source(value)

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


class LoraSpec(_Strict):
    """LoRA hyper-parameters; the defaults are the paper's (from alpaca-lora)."""

    r: int = Field(default=8, ge=1, le=4096, description="LoRA rank")
    alpha: int = Field(
        default=16, ge=1, le=1_000_000, description="LoRA scaling numerator (lora_alpha)"
    )
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGET_MODULES), min_length=1
    )
    merge: bool = Field(
        default=True, description="Also save the merged full model (merge_and_unload)"
    )


class CptSpec(_Strict):
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
    learning_rate: LearningRate = 1e-4
    warmup_steps: int = Field(default=100, ge=0, le=MAX_STEPS)
    weight_decay: float = Field(default=0.0, ge=0.0, le=10.0)
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
        default=1.0, gt=0.0, le=100.0, description="Softmax temperature of both distributions"
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
        return None if value is None else _check_source(value)


class RetrainSpec(_JobSpec):
    """Retrain a (pruned) model: LoRA, continued pretraining (CPT), CPT followed by LoRA, or
    knowledge distillation from the parent (KD, settings in ``kd``).

    ``learning_rate``, ``epochs``, ``cutoff_len`` and ``warmup_steps`` are the LoRA stage's
    (the paper's defaults); the CPT stage takes its own from ``cpt``. Batch sizes,
    ``max_steps``, checkpointing and logging apply to every stage.
    """

    model: str = Field(
        description="Local directory, s3://bucket/prefix/, hf://org/name[@rev] or job://<id>"
    )
    method: RetrainMethod = "lora"
    data: TrainDataSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    cpt: CptSpec | None = Field(
        default=None, validate_default=True, description="Required for cpt and cpt_lora"
    )
    kd: KdSpec | None = Field(default=None, description="Required for kd")
    learning_rate: LearningRate = 1e-4
    epochs: float = Field(default=2.0, gt=0.0, le=MAX_EPOCHS)
    micro_batch_size: int = Field(default=4, ge=1, le=4096)
    batch_size: int = Field(
        default=64,
        ge=1,
        le=1_000_000,
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
    dtype: Dtype = Field(default="auto", description="Weights dtype (auto: chosen for the device)")
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="cpu, cuda or cuda:N (auto: CUDA when available)",
    )
    max_shard_size: str | None = Field(
        default=None,
        pattern=SHARD_SIZE_PATTERN,
        description="Largest safetensors shard of the saved model, e.g. 2GB or 500MB (default: "
        "the source checkpoint's largest shard, or 5GB for a single-file source)",
    )

    @field_validator("model")
    @classmethod
    def _model_ok(cls, value: str) -> str:
        return _check_source(value)

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


# --- Evaluation -------------------------------------------------------------------

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
# Data files the engine reads (calibration, training and evaluation text).
DATA_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


class PerplexitySpec(_Strict):
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
        return [_check_source(v) for v in values]


class ZeroShotSpec(_Strict):
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


class EfficiencySpec(_Strict):
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


class EvalSpec(_JobSpec):
    """Evaluate a model (and optionally its parent, with deltas): perplexity, zero-shot
    accuracy, efficiency. At least one section is given."""

    model: str = Field(
        description="Local directory, s3://bucket/prefix/, hf://org/name[@rev] or job://<id>"
    )
    compare_with: str | None = Field(
        default=None, description="Baseline (e.g. the unpruned parent) evaluated the same way"
    )
    perplexity: PerplexitySpec | None = None
    zero_shot: ZeroShotSpec | None = None
    efficiency: EfficiencySpec | None = None
    dtype: Dtype = Field(default="auto", description="Weights dtype (auto: chosen for the device)")
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="cpu, cuda or cuda:N (auto: CUDA when available)",
    )

    @field_validator("model", "compare_with")
    @classmethod
    def _source_ok(cls, value: str | None) -> str | None:
        return None if value is None else _check_source(value)

    @model_validator(mode="after")
    def _something_to_do(self) -> EvalSpec:
        if self.perplexity is None and self.zero_shot is None and self.efficiency is None:
            raise ValueError("give at least one of 'perplexity', 'zero_shot' and 'efficiency'")
        return self


# --- Pipelines --------------------------------------------------------------------
# Sections of a PruneSpec: the follow-up jobs' specs without ``model``, which the worker
# fills in with ``job://<parent id>`` when the parent job succeeds.


class PipelineRetrain(RetrainSpec):
    """A RetrainSpec without ``model``: the pruned model (``job://<prune id>``) is retrained."""

    model: None = Field(default=None, exclude=True, description="Not given: the parent job's model")  # type: ignore[assignment]  # torch/transformers stubs

    @field_validator("model")
    @classmethod
    def _model_ok(cls, value: None) -> None:  # type: ignore[override]
        return value

    def _check_teacher(self, kd: KdSpec) -> None:
        """The teacher may be left out: ``for_model`` fills in the pruned model's source."""

    def for_model(self, model: str, teacher: str | None = None) -> RetrainSpec:
        """The follow-up job's spec: ``model`` retrained; KD's teacher, unless given, is
        ``teacher`` (the prune job's source model, the unpruned parent)."""
        data = {**self.model_dump(mode="json"), "model": model}
        if data.get("kd") is not None and data["kd"].get("teacher") is None:
            data["kd"]["teacher"] = teacher
        return RetrainSpec.model_validate(data)


class PipelineEval(EvalSpec):
    """An EvalSpec without ``model``: the pipeline's last model is evaluated. ``compare_with``
    defaults to the pruned model (after a retrain) or the unpruned one (otherwise)."""

    model: None = Field(default=None, exclude=True, description="Not given: the parent job's model")  # type: ignore[assignment]  # torch/transformers stubs

    @field_validator("model")
    @classmethod
    def _source_ok(cls, value: str | None) -> str | None:  # type: ignore[override]
        return None if value is None else _check_source(value)

    def for_model(self, model: str, compare_with: str | None) -> EvalSpec:
        data = self.model_dump(mode="json")
        data["model"] = model
        if data.get("compare_with") is None:
            data["compare_with"] = compare_with
        return EvalSpec.model_validate(data)


PruneSpec.model_rebuild()
SearchSpec.model_rebuild()


JOB_SPECS: dict[str, type[_JobSpec]] = {
    "prune": PruneSpec,
    "retrain": RetrainSpec,
    "eval": EvalSpec,
    "search": SearchSpec,
}
