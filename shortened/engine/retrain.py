"""Retraining a pruned model: LoRA, continued pretraining (CPT), or CPT followed by LoRA.

One readable recipe per stage, built on transformers' ``Trainer`` (so multi-GPU runs work
through accelerate/torchrun, and checkpoints/resume are Trainer's own):

    data (records -> tokenized examples or packed blocks, held-out split)
      -> model (full parameters for CPT, a peft LoRA wrapper for LoRA)
      -> Trainer (AdamW, warm-up + linear (LoRA) / cosine (CPT) schedule, checkpoints)
      -> outputs (merged model + adapter/, or the CPT model; report.json), written atomically.

The paper's LoRA recipe is alpaca-lora's: Alpaca prompt template, loss on the response only,
r=8, alpha=16, dropout 0.05 on every attention and MLP projection, lr 1e-4, 2 epochs, batch 64
(micro-batch 4 x gradient accumulation), cutoff 256 tokens, 100 warm-up steps.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import RetrainSpec, TrainDataSpec

from .calibration import fetch_data_file, read_documents, read_parquet, read_text
from .errors import CalibrationError, DataError, RetrainError
from .models import count_parameters, load_model, pick_device
from .progress import Progress, ProgressCallback, no_progress
from .prune import atomic_output_dir, check_output_dir, library_versions

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)
CPT_DEFAULT_SEQ_LEN = 2048

# alpaca-lora's templates/alpaca.json, which the paper's lora_retrain.py uses.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "", output: str = "") -> str:  # noqa: A002 - Alpaca's field name
    """The Alpaca prompt for one record, followed by ``output`` (empty: the prompt alone)."""
    template = ALPACA_PROMPT_WITH_INPUT if input else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input) + output


# --- data ------------------------------------------------------------------------------------


def read_records(path: Path, field: str = "text") -> list[dict[str, Any]]:
    """Records of a local file: .jsonl (an object a line), .json (an array of objects, or
    JSON lines), .parquet rows, or .txt blank-line separated documents as ``{field: text}``."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            return [{field: doc} for doc in read_documents(path)]
        except CalibrationError as exc:
            raise DataError(str(exc)) from exc
    if suffix == ".parquet":
        records = read_parquet(path, DataError).to_pylist()
    elif suffix in (".jsonl", ".json"):
        text = read_text(path, DataError)
        records = []
        try:
            whole = json.loads(text) if suffix == ".json" else None
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            records = whole
        else:
            for line_number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path.name} line {line_number}: not JSON ({exc.msg})"
                    ) from exc
    else:
        raise DataError(
            f"unsupported data file type {suffix!r}; use .txt, .jsonl, .json or .parquet"
        )
    if not records:
        raise DataError(f"data file {path.name} contains no records")
    for index, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path.name} record {index}: not a JSON object")
    return records


def _hf_dataset(data: TrainDataSpec) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(
            data.dataset, data.dataset_config, split=data.split, streaming=data.streaming
        )
    except Exception as exc:  # datasets raises many types for a bad name/split/offline hub
        raise DataError(
            f"cannot open HF dataset {data.dataset!r} (split {data.split!r}): {exc}"
        ) from exc


def record_format(record: dict[str, Any], data: TrainDataSpec) -> str:
    """``alpaca`` or ``text``: the spec's format, or guessed from the first record."""
    if data.format != "auto":
        return data.format
    return "alpaca" if "instruction" in record and "output" in record else "text"


def _check_record(record: dict[str, Any], fmt: str, data: TrainDataSpec, where: str) -> None:
    needed = ("instruction", "output") if fmt == "alpaca" else (data.field,)
    missing = [name for name in needed if name not in record]
    if missing:
        raise DataError(f"{where}: {fmt} record without field(s) {missing} (has {sorted(record)})")


def record_text(record: dict[str, Any], fmt: str, data: TrainDataSpec) -> str:
    """The raw text of a record (CPT trains on Alpaca records rendered with their prompt)."""
    if fmt == "alpaca":
        return alpaca_prompt(
            str(record["instruction"]), str(record.get("input") or ""), str(record["output"])
        )
    return str(record[data.field])


def _encode(tokenizer: Any, text: str, cutoff_len: int, add_eos: bool) -> list[int]:
    ids = list(tokenizer(text, truncation=True, max_length=cutoff_len)["input_ids"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids.append(eos)
    return ids


def tokenize_example(
    record: dict[str, Any], fmt: str, tokenizer: Any, data: TrainDataSpec, cutoff_len: int
) -> dict[str, list[int]]:
    """One supervised example as alpaca-lora builds it: the full prompt + response (+ EOS),
    truncated to ``cutoff_len``; unless ``train_on_inputs``, prompt tokens get no loss."""
    if fmt == "alpaca":
        instruction, input_text = str(record["instruction"]), str(record.get("input") or "")
        input_ids = _encode(
            tokenizer,
            alpaca_prompt(instruction, input_text, str(record["output"])),
            cutoff_len,
            add_eos=True,
        )
        labels = list(input_ids)
        if not data.train_on_inputs:
            prompt_len = len(
                _encode(
                    tokenizer, alpaca_prompt(instruction, input_text), cutoff_len, add_eos=False
                )
            )
            labels = [IGNORE_INDEX] * prompt_len + labels[prompt_len:]
    else:
        input_ids = _encode(tokenizer, record_text(record, fmt, data), cutoff_len, add_eos=True)
        labels = list(input_ids)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def pack_blocks(
    texts: Iterable[str], tokenizer: Any, seq_len: int, chunk: int = 256
) -> Iterator[list[int]]:
    """Concatenate documents (BOS + tokens + EOS each) and cut the stream into blocks of
    exactly ``seq_len`` tokens; the incomplete tail is dropped."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    buffer: list[int] = []
    texts = iter(texts)
    while batch := list(itertools.islice(texts, chunk)):
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            buffer.extend(
                ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
            )
        start = 0
        while len(buffer) - start >= seq_len:
            yield buffer[start : start + seq_len]
            start += seq_len
        del buffer[:start]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class StreamDataset(torch.utils.data.IterableDataset):
    """A re-iterable stream of examples (each epoch calls ``make`` again)."""

    def __init__(self, make: Callable[[], Iterator[dict[str, Any]]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.make()


@dataclass
class StageData:
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset | None
    format: str
    train_records: int | None  # None: streamed
    eval_records: int
    train_items: int | None  # examples (LoRA) or packed blocks (CPT); None: streamed
    eval_items: int
    dropped_examples: int = 0


def _split(
    records: list[dict[str, Any]], data: TrainDataSpec, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    records = list(records)
    random.Random(seed).shuffle(records)
    if data.validation_size is not None:
        n_val = data.validation_size
    elif data.validation_fraction > 0:
        n_val = max(1, round(len(records) * data.validation_fraction))
    else:
        n_val = 0
    if n_val >= len(records):
        raise DataError(
            f"holding out {n_val} validation records leaves none of {len(records)} for training"
        )
    validation, train = records[:n_val], records[n_val:]
    if data.max_records is not None:
        train = train[: data.max_records]
    return train, validation


def _to_items(
    records: list[dict[str, Any]],
    fmt: str,
    kind: str,
    tokenizer: Any,
    data: TrainDataSpec,
    length: int,
    where: str,
) -> tuple[list[dict[str, Any]], int]:
    for index, record in enumerate(records, 1):
        _check_record(record, fmt, data, f"{where} record {index}")
    if kind == "cpt":
        blocks = [
            {"input_ids": b, "labels": list(b)}
            for b in pack_blocks((record_text(r, fmt, data) for r in records), tokenizer, length)
        ]
        return blocks, 0
    examples = [tokenize_example(r, fmt, tokenizer, data, length) for r in records]
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    return kept, len(examples) - len(kept)


def build_stage_data(
    data: TrainDataSpec,
    tokenizer: Any,
    *,
    kind: str,
    length: int,
    seed: int,
    store: ArtifactStore | None,
    cache_dir: Path | None,
) -> StageData:
    """Training (and validation) data of one stage: tokenized examples truncated to
    ``length`` for LoRA (``kind="lora"``), packed blocks of ``length`` tokens for CPT."""
    validation_records: list[dict[str, Any]] | None = None
    if data.validation_source is not None:
        validation_records = read_records(
            fetch_data_file(data.validation_source, store=store, cache_dir=cache_dir), data.field
        )

    if data.dataset is not None and data.streaming:
        stream = _hf_dataset(data).shuffle(seed=seed, buffer_size=10_000)
        try:
            first = next(iter(stream))
        except StopIteration:
            raise DataError(f"HF dataset {data.dataset!r} is empty") from None
        fmt = record_format(first, data)
        if data.validation_size is not None:
            validation_records = list(itertools.islice(iter(stream), data.validation_size))
            stream = stream.skip(data.validation_size)
        if data.max_records is not None:
            stream = stream.take(data.max_records)

        def checked(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            for record in records:
                _check_record(record, fmt, data, f"HF dataset {data.dataset}")
                yield record

        def make_train() -> Iterator[dict[str, Any]]:
            if kind == "cpt":
                texts = (record_text(r, fmt, data) for r in checked(stream))
                return (
                    {"input_ids": b, "labels": list(b)}
                    for b in pack_blocks(texts, tokenizer, length)
                )
            examples = (tokenize_example(r, fmt, tokenizer, data, length) for r in checked(stream))
            return (e for e in examples if any(label != IGNORE_INDEX for label in e["labels"]))

        train: torch.utils.data.Dataset = StreamDataset(make_train)
        train_records = train_items = None
        dropped = 0
    else:
        if data.dataset is not None:
            records = [dict(r) for r in _hf_dataset(data)]
            where = f"HF dataset {data.dataset}"
            if not records:
                raise DataError(f"HF dataset {data.dataset!r} split {data.split!r} is empty")
        else:
            assert data.source is not None
            path = fetch_data_file(data.source, store=store, cache_dir=cache_dir)
            records = read_records(path, data.field)
            where = path.name
        fmt = record_format(records[0], data)
        if validation_records is None:
            train_records_list, validation_records = _split(records, data, seed)
        else:
            train_records_list = records[: data.max_records] if data.max_records else records
        items, dropped = _to_items(train_records_list, fmt, kind, tokenizer, data, length, where)
        if not items:
            what = (
                f"a block of {length} tokens"
                if kind == "cpt"
                else "an example with response tokens within cutoff_len"
            )
            raise DataError(
                f"{where}: the training data yields no {what} ({len(train_records_list)} records)"
            )
        train = ListDataset(items)
        train_records, train_items = len(train_records_list), len(items)

    eval_dataset = None
    eval_items = 0
    if validation_records:
        items, _ = _to_items(
            validation_records, fmt, kind, tokenizer, data, length, "validation data"
        )
        if not items:
            raise DataError(
                f"the validation data yields no {'blocks' if kind == 'cpt' else 'examples'} of usable length"
            )
        eval_dataset, eval_items = ListDataset(items), len(items)
    return StageData(
        train,
        eval_dataset,
        fmt,
        train_records,
        len(validation_records or []),
        train_items,
        eval_items,
        dropped,
    )


# --- training ----------------------------------------------------------------------------------


@dataclass
class Precision:
    """Weights dtype and Trainer mixed-precision flags of one run."""

    weights: torch.dtype
    bf16: bool = False
    fp16: bool = False

    @property
    def label(self) -> str:
        weights = str(self.weights).removeprefix("torch.")
        autocast = "bf16" if self.bf16 else "fp16" if self.fp16 else None
        return f"{weights} weights" + (f", {autocast} autocast" if autocast else "")


def choose_precision(method: str, dtype: str, device: torch.device) -> Precision:
    """CPU: fp32 (bf16 if asked). CUDA, ``auto``: CPT keeps fp32 master weights under bf16
    autocast (fp16 where bf16 is unsupported); LoRA freezes the base in bf16/fp16 and trains
    fp32 adapters under autocast. Full-parameter training with fp16 weights is refused."""
    if method != "lora" and dtype == "float16":
        raise RetrainError(
            "full-parameter training (CPT) in float16 weights is unstable; use dtype auto or bfloat16"
        )
    if device.type != "cuda":
        if dtype == "float16":
            raise RetrainError(
                "float16 training needs a CUDA device; use float32 or bfloat16 on CPU"
            )
        return (
            Precision(torch.bfloat16, bf16=True)
            if dtype == "bfloat16"
            else Precision(torch.float32)
        )
    bf16_ok = torch.cuda.is_bf16_supported()
    if dtype == "float32":
        return Precision(torch.float32)
    if dtype == "bfloat16":
        return Precision(torch.bfloat16, bf16=True)
    if dtype == "float16":
        return Precision(torch.float16, fp16=True)
    half = torch.bfloat16 if bf16_ok else torch.float16
    weights = torch.float32 if method != "lora" else half
    return Precision(weights, bf16=half == torch.bfloat16, fp16=half == torch.float16)


class ProgressReporter:
    """The TrainerCallback that turns Trainer's step/log/eval events into ``Progress`` updates.

    The engine's progress callback may raise ``Cancelled``: it propagates out of
    ``trainer.train()`` at the end of the current optimizer step.
    """

    def __init__(self, progress: ProgressCallback, stage: str) -> None:
        from transformers import TrainerCallback

        reporter = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                reporter.report(state)

            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                reporter.report(state)

            def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
                if reporter.update(logs or {}, state.global_step):
                    reporter.report(state)

        self.callback = _Callback()
        self.progress = progress
        self.stage = stage
        self.metrics: dict[str, float] = {}
        self.loss_history: list[tuple[int, float]] = []
        self.eval_history: list[tuple[int, float]] = []

    def update(self, logs: dict[str, Any], step: int) -> bool:
        changed = False
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if isinstance(logs.get(key), int | float) and math.isfinite(logs[key]):
                self.metrics[key] = float(logs[key])
                changed = True
        if "loss" in logs:
            self.loss_history.append((step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.eval_history.append((step, float(logs["eval_loss"])))
        return changed

    def report(self, state: Any) -> None:
        self.progress(
            Progress(
                "training",
                state.global_step,
                state.max_steps,
                "steps",
                message=self.stage,
                metrics=dict(self.metrics),
            )
        )


def _training_arguments(**kwargs: Any) -> Any:
    """TrainingArguments, with the argument names of the installed transformers."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    if "activation_checkpointing" not in names:
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
        kwargs["gradient_checkpointing_kwargs"] = kwargs.pop("activation_checkpointing_kwargs")
    if "include_num_input_tokens_seen" in names:  # a bool before transformers 5, "all" since
        counting = TrainingArguments.include_num_input_tokens_seen
        kwargs["include_num_input_tokens_seen"] = "all" if isinstance(counting, str) else True
    return TrainingArguments(**kwargs)


@dataclass
class StageSettings:
    name: str  # cpt | lora
    learning_rate: float
    warmup_steps: int
    scheduler: str
    max_steps: int | None  # None: epochs decide
    epochs: float
    length: int  # cutoff_len (LoRA) or packed seq_len (CPT)
    weight_decay: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _prepare_checkpoint_dir(stage_dir: Path | None, spec: RetrainSpec, resume: bool) -> str | None:
    """The last checkpoint to resume from, or None. A directory holding another spec's run is
    refused (resume) or cleared (no resume)."""
    if stage_dir is None:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    marker = stage_dir / "retrain_spec.json"
    wanted = spec.model_dump(mode="json")
    if resume and marker.is_file() and json.loads(marker.read_text()) != wanted:
        raise RetrainError(
            f"checkpoint directory {str(stage_dir)!r} holds checkpoints of a different retrain spec; "
            "resume with the same spec, or start over (resume=False)"
        )
    if is_main_process():
        if stage_dir.is_dir() and not resume:
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(wanted, indent=2))
    return get_last_checkpoint(str(stage_dir)) if resume and stage_dir.is_dir() else None


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a plain single process): the one that
    writes outputs; Trainer itself already saves checkpoints from rank 0 only."""
    return int(os.environ.get("RANK", "0")) == 0


def train_stage(
    model: Any,
    tokenizer: Any,
    data: StageData,
    settings: StageSettings,
    spec: RetrainSpec,
    precision: Precision,
    device: torch.device,
    *,
    stage_dir: Path | None,
    resume: bool,
    progress: ProgressCallback,
) -> dict[str, Any]:
    """Run Trainer on one stage; return the stage's report entry."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, default_data_collator

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = max(1, spec.batch_size // (spec.micro_batch_size * world_size))
    gradient_checkpointing = (
        spec.gradient_checkpointing
        if spec.gradient_checkpointing is not None
        else device.type == "cuda"
    )
    resume_from = _prepare_checkpoint_dir(stage_dir, spec, resume)
    scratch = (
        None
        if stage_dir is not None
        else Path(tempfile.mkdtemp(prefix=f"shortened-{settings.name}-"))
    )
    run_dir = stage_dir or scratch
    assert run_dir is not None

    if settings.name == "cpt":
        collator = default_data_collator
    else:
        collator = DataCollatorForSeq2Seq(
            tokenizer,
            padding=True,
            pad_to_multiple_of=8,
            label_pad_token_id=IGNORE_INDEX,
            return_tensors="pt",
        )
    args = _training_arguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=spec.micro_batch_size,
        per_device_eval_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        optim="adamw_torch",
        logging_steps=spec.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if data.eval is not None else "no",
        eval_on_start=data.eval is not None,  # the validation loss before training, for the report
        eval_steps=spec.eval_steps or spec.save_steps,
        save_strategy="steps" if stage_dir is not None else "no",
        save_steps=spec.save_steps,
        save_total_limit=spec.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=device.type == "cpu",
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}
        if gradient_checkpointing
        else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    reporter = ProgressReporter(progress, settings.name)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator,
        callbacks=[reporter.callback],
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through the callback, not stdout
    model.config.use_cache = False
    clock = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=resume_from)
        eval_loss = None
        if data.eval is not None:
            eval_loss = float(trainer.evaluate()["eval_loss"])
            reporter.metrics["eval_loss"] = eval_loss
            reporter.report(trainer.state)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    model.config.use_cache = True
    state = trainer.state
    return {
        "stage": settings.name,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": round(float(state.epoch or 0.0), 4),
        "resumed_from_step": int(Path(resume_from).name.rsplit("-", 1)[-1])
        if resume_from
        else None,
        "learning_rate": settings.learning_rate,
        "lr_scheduler": settings.scheduler,
        "warmup_steps": settings.warmup_steps,
        "weight_decay": settings.weight_decay,
        "micro_batch_size": spec.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "world_size": world_size,
        "effective_batch_size": spec.micro_batch_size * accumulation * world_size,
        "gradient_checkpointing": gradient_checkpointing,
        "data_format": data.format,
        "train_records": data.train_records,
        "train_items": data.train_items,
        "eval_records": data.eval_records,
        "eval_items": data.eval_items,
        "dropped_examples": data.dropped_examples,
        "tokens_seen": getattr(state, "num_input_tokens_seen", None) or None,
        "train_loss_mean": float(output.training_loss),
        "train_loss_last": reporter.loss_history[-1][1] if reporter.loss_history else None,
        "eval_loss_start": reporter.eval_history[0][1] if reporter.eval_history else None,
        "eval_loss": eval_loss,
        "loss_history": reporter.loss_history,
        "eval_loss_history": reporter.eval_history,
        "runtime_s": round(time.perf_counter() - clock, 3),
        **settings.extra,
    }


def _lora_targets(model: torch.nn.Module, wanted: list[str]) -> tuple[list[str], list[str]]:
    linear_names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    found = [t for t in wanted if t in linear_names]
    if not found:
        raise RetrainError(
            f"none of the LoRA target modules {wanted} is a linear layer of this model; "
            f"its linear layers are named {sorted(linear_names)}"
        )
    return found, [t for t in wanted if t not in linear_names]


def _training_tokenizer(tokenizer: Any) -> Any:
    """A copy with a pad token (UNK, else EOS, as the paper's code) and right padding; the
    saved tokenizer stays as loaded."""
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (
            tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        )
    tokenizer.padding_side = "right"
    return tokenizer


def _cpt_seq_len(spec: RetrainSpec, model: Any) -> int:
    assert spec.cpt is not None
    if spec.cpt.seq_len is not None:
        return spec.cpt.seq_len
    return min(
        CPT_DEFAULT_SEQ_LEN,
        int(getattr(model.config, "max_position_embeddings", CPT_DEFAULT_SEQ_LEN)),
    )


def _cpt_max_steps(spec: RetrainSpec, seq_len: int) -> int:
    assert spec.cpt is not None
    steps = spec.cpt.max_steps or math.ceil(
        (spec.cpt.max_tokens or 0) / (spec.batch_size * seq_len)
    )
    return min(steps, spec.max_steps) if spec.max_steps else steps


def retrain_model(
    spec: RetrainSpec,
    output_dir: Path,
    *,
    progress: ProgressCallback = no_progress,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Retrain ``spec.model`` with LoRA, CPT or CPT+LoRA and save the result to ``output_dir``.

    Outputs: the full model (LoRA: merged with ``merge_and_unload``) as a Hugging Face
    checkpoint with its tokenizer; for LoRA also ``adapter/`` (peft ``save_pretrained``); for
    cpt_lora also ``cpt/`` (the CPT model, the adapter's base); and ``report.json``.

    Trainer checkpoints go to ``checkpoint_dir/<stage>/checkpoint-N`` every ``save_steps``;
    with ``resume`` a restarted run continues from the last one (no ``checkpoint_dir``: no
    checkpoints). Progress is reported per optimizer step with the latest ``loss`` and
    ``eval_loss``; the callback may raise ``Cancelled`` to stop within one step, and then
    nothing is written to ``output_dir``.
    """
    from transformers import set_seed

    output_dir = Path(output_dir)
    check_output_dir(output_dir)  # fail before loading anything
    checkpoint_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    started = clock = time.perf_counter()
    timings: dict[str, float] = {}

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    local_rank = os.environ.get("LOCAL_RANK")
    device = pick_device(
        f"cuda:{local_rank}"
        if spec.device == "auto" and local_rank is not None and torch.cuda.is_available()
        else spec.device
    )
    precision = choose_precision(spec.method, spec.dtype, device)
    weights_dtype = str(precision.weights).removeprefix("torch.")
    set_seed(spec.seed)

    # cpt_lora resumed after its CPT stage finished: start the LoRA stage from the saved CPT model.
    cpt_done_dir = checkpoint_root / "cpt" / "final" if checkpoint_root is not None else None
    cpt_already_done = bool(
        spec.method == "cpt_lora"
        and resume
        and cpt_done_dir is not None
        and (cpt_done_dir / "stage_report.json").is_file()
    )
    progress(Progress("loading", message=spec.model))
    loaded = load_model(
        spec.model, dtype=weights_dtype, device=str(device), store=store, cache_dir=cache_dir
    )
    tokenizer = loaded.tokenizer
    source_dtype = loaded.source_dtype
    params_before = count_parameters(loaded.model)
    model = loaded.model
    if cpt_already_done:
        assert cpt_done_dir is not None
        model = load_model(str(cpt_done_dir), dtype=weights_dtype, device=str(device)).model
    train_tokenizer = _training_tokenizer(tokenizer)
    phase("load_s")

    stages: list[dict[str, Any]] = []
    trainable: dict[str, int] = {}
    lora_info: dict[str, Any] = {}
    scratch_cpt: Path | None = None
    peft_model = None
    try:
        if spec.method in ("cpt", "cpt_lora") and not cpt_already_done:
            assert spec.cpt is not None
            seq_len = _cpt_seq_len(spec, model)
            progress(Progress("data", message=f"cpt: packing into {seq_len}-token blocks"))
            cpt_data = build_stage_data(
                spec.cpt.data or spec.data,
                train_tokenizer,
                kind="cpt",
                length=seq_len,
                seed=spec.seed,
                store=store,
                cache_dir=cache_dir,
            )
            phase("cpt_data_s")
            settings = StageSettings(
                "cpt",
                spec.cpt.learning_rate,
                spec.cpt.warmup_steps,
                "cosine",
                _cpt_max_steps(spec, seq_len),
                1.0,
                seq_len,
                weight_decay=spec.cpt.weight_decay,
                extra={"seq_len": seq_len, "max_tokens": spec.cpt.max_tokens},
            )
            model.train()
            for p in model.parameters():
                p.requires_grad_(True)
            trainable["cpt"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            stage = train_stage(
                model,
                train_tokenizer,
                cpt_data,
                settings,
                spec,
                precision,
                device,
                stage_dir=checkpoint_root / "cpt" if checkpoint_root else None,
                resume=resume,
                progress=progress,
            )
            stage["trainable_params"] = trainable["cpt"]
            stages.append(stage)
            phase("cpt_train_s")
            model.eval()
            if spec.method == "cpt_lora":
                # The LoRA stage edits the modules in place: keep the CPT model on disk (it is the
                # adapter's base, and what a resumed run starts its LoRA stage from).
                if cpt_done_dir is None:
                    scratch_cpt = Path(tempfile.mkdtemp(prefix="shortened-cpt-"))
                target = cpt_done_dir or scratch_cpt
                assert target is not None
                if is_main_process():
                    _save_model(model, tokenizer, target, source_dtype)
                    (target / "stage_report.json").write_text(json.dumps(stage, indent=2))
                    if cpt_done_dir is not None:  # its Trainer checkpoints are superseded
                        for finished in cpt_done_dir.parent.glob("checkpoint-*"):
                            shutil.rmtree(finished, ignore_errors=True)
        elif cpt_already_done:
            assert cpt_done_dir is not None
            stage = json.loads((cpt_done_dir / "stage_report.json").read_text())
            stages.append(stage)
            trainable["cpt"] = stage.get("trainable_params", 0)

        if spec.method in ("lora", "cpt_lora"):
            from peft import LoraConfig, get_peft_model

            progress(Progress("data", message=f"lora: tokenizing (cutoff {spec.cutoff_len})"))
            lora_data = build_stage_data(
                spec.data,
                train_tokenizer,
                kind="lora",
                length=spec.cutoff_len,
                seed=spec.seed,
                store=store,
                cache_dir=cache_dir,
            )
            if lora_data.train_items is None and spec.max_steps is None:
                raise DataError("a streamed dataset has no known length: give max_steps")
            phase("lora_data_s")
            targets, missing = _lora_targets(model, spec.lora.target_modules)
            config = LoraConfig(
                r=spec.lora.r,
                lora_alpha=spec.lora.alpha,
                lora_dropout=spec.lora.dropout,
                target_modules=targets,
                bias="none",
                task_type="CAUSAL_LM",
            )
            with warnings.catch_warnings():
                # peft probes a deprecated transformers attribute; not the user's concern.
                warnings.filterwarnings(
                    "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
                )
                peft_model = get_peft_model(model, config)
            trainable["lora"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            lora_info = {
                "r": spec.lora.r,
                "alpha": spec.lora.alpha,
                "dropout": spec.lora.dropout,
                "target_modules": targets,
                "missing_target_modules": missing,
            }
            settings = StageSettings(
                "lora",
                spec.learning_rate,
                spec.warmup_steps,
                "linear",
                spec.max_steps,
                spec.epochs,
                spec.cutoff_len,
                extra={"cutoff_len": spec.cutoff_len, "lora": lora_info},
            )
            stage = train_stage(
                peft_model,
                train_tokenizer,
                lora_data,
                settings,
                spec,
                precision,
                device,
                stage_dir=checkpoint_root / "lora" if checkpoint_root else None,
                resume=resume,
                progress=progress,
            )
            stage["trainable_params"] = trainable["lora"]
            stages.append(stage)
            phase("lora_train_s")

        progress(Progress("saving", message=str(output_dir)))
        report: dict[str, Any] = {
            "model": spec.model,
            "method": spec.method,
            "architecture": loaded.adapter.name,
            "model_type": model.config.model_type,
            "num_layers": loaded.adapter.num_layers(model),
            "hyperparameters": spec.model_dump(mode="json"),
            "stages": stages,
            "steps": sum(s["steps"] for s in stages),
            "final_train_loss": stages[-1]["train_loss_last"],
            "final_eval_loss": stages[-1]["eval_loss"],
            "params": params_before,
            "trainable_params": trainable,
            "precision": precision.label,
            "device": str(device),
            "outputs": {"model": "."},
            "versions": _versions(),
            "timings": timings,
        }
        if not is_main_process():
            return report  # rank 0 writes the outputs
        with atomic_output_dir(output_dir) as staging:
            if peft_model is not None:
                adapter_base = (
                    str(output_dir.resolve() / "cpt")
                    if spec.method == "cpt_lora"
                    else loaded.resolved.path_or_id
                )
                peft_model.save_pretrained(str(staging / "adapter"))
                _set_adapter_base(staging / "adapter", adapter_base)
                tokenizer.save_pretrained(staging / "adapter")
                report["outputs"]["adapter"] = "adapter"
                report["adapter_base"] = adapter_base
                if spec.method == "cpt_lora":
                    cpt_saved = (
                        cpt_done_dir
                        if cpt_done_dir is not None and cpt_done_dir.is_dir()
                        else scratch_cpt
                    )
                    assert cpt_saved is not None
                    shutil.copytree(
                        cpt_saved,
                        staging / "cpt",
                        ignore=shutil.ignore_patterns("stage_report.json"),
                    )
                    report["outputs"]["cpt_model"] = "cpt"
                if spec.lora.merge:
                    model = peft_model.merge_and_unload()
            if peft_model is None or spec.lora.merge:
                _save_model(model, tokenizer, staging, source_dtype)
                report["params"] = count_parameters(model)
            else:
                report["outputs"].pop("model")
            phase("saving_s")
            timings["total_s"] = round(time.perf_counter() - started, 3)
            report["timings"] = timings
            (staging / "report.json").write_text(json.dumps(report, indent=2))
    finally:
        if scratch_cpt is not None:
            shutil.rmtree(scratch_cpt, ignore_errors=True)
    log.info(
        "retrained %s with %s: %d steps, final loss %s",
        spec.model,
        spec.method,
        report["steps"],
        report["final_train_loss"],
    )
    return report


def _save_model(model: Any, tokenizer: Any, path: Path, source_dtype: torch.dtype | None) -> None:
    """save_pretrained in the source checkpoint's precision (the model keeps its own)."""
    current = next(model.parameters()).dtype
    if source_dtype is not None and source_dtype != current:
        model.to(source_dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if source_dtype is not None and source_dtype != current:
        model.to(current)


def _set_adapter_base(adapter_dir: Path, base: str) -> None:
    """Point adapter_config.json at the model the adapter was trained on (for cpt_lora: the
    ``cpt/`` model next to it, not the pruned model the run started from)."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _versions() -> dict[str, str]:
    import accelerate
    import peft

    return {**library_versions(), "peft": peft.__version__, "accelerate": accelerate.__version__}
