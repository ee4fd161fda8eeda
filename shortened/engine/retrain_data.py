"""Retraining data: records from files or Hugging Face datasets, rendered (Alpaca prompt, raw
text, or the model's chat template: ``chat.py``), tokenized into supervised examples (LoRA) or packed into fixed-length blocks (CPT), with
a held-out validation split.

The paper's LoRA data is alpaca-lora's: the Alpaca prompt template, the loss on the response
only, examples cut at ``cutoff_len`` tokens.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import TrainDataSpec

from .calibration import fetch_data_file, read_records
from .chat import chat_ids, prompt_part, record_messages, render_chat, require_chat_template
from .errors import DataError

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)


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
    """``chat`` (``chat_template``), else ``alpaca`` or ``text``: the spec's format, or guessed
    from the first record."""
    if data.chat_template:
        return "chat"
    if data.format != "auto":
        return data.format
    return "alpaca" if "instruction" in record and "output" in record else "text"


def _check_record(record: dict[str, Any], fmt: str, data: TrainDataSpec, where: str) -> None:
    if fmt == "chat":
        record_messages(record, data.field, where)
        return
    needed = ("instruction", "output") if fmt == "alpaca" else (data.field,)
    missing = [name for name in needed if name not in record]
    if missing:
        hint = "; 'messages' records need chat_template" if "messages" in record else ""
        raise DataError(
            f"{where}: {fmt} record without field(s) {missing} (has {sorted(record)}){hint}"
        )


def record_text(record: dict[str, Any], fmt: str, data: TrainDataSpec, tokenizer: Any) -> str:
    """The raw text of a record (CPT trains on Alpaca records rendered with their prompt, and
    on chats as the model's template writes them)."""
    if fmt == "chat":
        return render_chat(tokenizer, record_messages(record, data.field, "a record"))
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
    if fmt == "chat":
        return _chat_example(record, tokenizer, data, cutoff_len)
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
        input_ids = _encode(
            tokenizer, record_text(record, fmt, data, tokenizer), cutoff_len, add_eos=True
        )
        labels = list(input_ids)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _chat_example(
    record: dict[str, Any], tokenizer: Any, data: TrainDataSpec, cutoff_len: int
) -> dict[str, list[int]]:
    """A chat as one supervised example: the whole rendered conversation, truncated to
    ``cutoff_len`` (no EOS added: the template closes its turns itself). Unless
    ``train_on_inputs``, the tokens of everything before the final assistant answer -- the
    conversation rendered up to its last non-assistant turn, with the generation prompt --
    get no loss; a chat without an assistant answer is trained on every token, as text is."""
    messages = record_messages(record, data.field, "a record")
    input_ids = chat_ids(tokenizer, render_chat(tokenizer, messages))[:cutoff_len]
    labels = list(input_ids)
    prompt = prompt_part(messages)
    if not data.train_on_inputs and len(prompt) < len(messages):
        rendered = render_chat(tokenizer, prompt, add_generation_prompt=True) if prompt else ""
        prompt_len = len(chat_ids(tokenizer, rendered)) if rendered else 0
        labels = [IGNORE_INDEX] * min(prompt_len, len(labels)) + labels[prompt_len:]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def pack_blocks(
    texts: Iterable[str], tokenizer: Any, seq_len: int, chunk: int = 256, *, wrap: bool = True
) -> Iterator[list[int]]:
    """Concatenate documents (BOS + tokens + EOS each; without ``wrap`` the tokens alone, for
    rendered chats that carry their own) and cut the stream into blocks of exactly
    ``seq_len`` tokens; the incomplete tail is dropped."""
    bos, eos = (tokenizer.bos_token_id, tokenizer.eos_token_id) if wrap else (None, None)
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
            for b in pack_blocks(
                (record_text(r, fmt, data, tokenizer) for r in records),
                tokenizer,
                length,
                wrap=fmt != "chat",
            )
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
    if data.chat_template:
        require_chat_template(tokenizer, "the training data")
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
                texts = (record_text(r, fmt, data, tokenizer) for r in checked(stream))
                return (
                    {"input_ids": b, "labels": list(b)}
                    for b in pack_blocks(texts, tokenizer, length, wrap=fmt != "chat")
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
