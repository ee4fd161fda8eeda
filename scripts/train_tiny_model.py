#!/usr/bin/env python
"""Train the tiny Llama-architecture model that the tests use as a real model.

Everything comes from text that is on every machine with Python: the docstrings of the
Python standard library. The script

1. extracts the docstrings (module, class, function) with :mod:`ast`, normalises their
   whitespace, keeps those of at least ``--min-words`` words, removes duplicates and splits
   them deterministically, by a hash of the text, into a training split and a held-out split;
2. writes the data files the tests use under ``--data-dir``:

   * ``stdlib_docs_train.jsonl``   -- training documents, ``{"name", "kind", "text"}``
   * ``stdlib_docs_heldout.txt``   -- held-out documents separated by blank lines
   * ``calibration.jsonl``         -- training documents long enough for 128-token windows
   * ``alpaca_tiny.jsonl``         -- Alpaca-style instruction records for LoRA tests;

3. trains a byte-level BPE tokenizer (``tokenizers``) on the training split and wraps it as a
   :class:`transformers.PreTrainedTokenizerFast` that prepends ``<s>`` like Llama's;
4. trains a 12-block :class:`transformers.LlamaForCausalLM` on 128-token windows of the
   training split with AdamW and a cosine schedule (a plain torch loop, single process);
5. reports the held-out perplexity over non-overlapping 128-token windows and saves the
   model, the tokenizer and ``TRAINING.md`` under ``--output``.

Reproduce the committed artifacts with::

    python scripts/train_tiny_model.py --output models/tiny-llama --data-dir data

The run is deterministic for a given Python version (the docstrings differ between
versions), torch version and thread count; it takes about seven minutes on two idle CPU
cores (longer on a busy machine, with the same result).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Deterministic, quiet and offline before the heavy imports read them.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD]

# Directories of the standard library whose docstrings are not wanted: test suites, the IDLE
# and 2to3 applications, demos, bundled wheels, generated data, third-party packages.
SKIPPED_STDLIB_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "turtledemo",
        "__phello__",
        "ensurepip",
        "pydoc_data",
        "lib-dynload",
        "encodings",
        "__pycache__",
    }
)

TRAIN_FILE = "stdlib_docs_train.jsonl"
HELDOUT_FILE = "stdlib_docs_heldout.txt"
CALIBRATION_FILE = "calibration.jsonl"
ALPACA_FILE = "alpaca_tiny.jsonl"


@dataclass(frozen=True)
class Document:
    """One docstring: ``name`` is the dotted path (``json.JSONDecoder.decode``)."""

    name: str
    kind: str  # "module", "class" or "function"
    text: str

    @property
    def split_key(self) -> float:
        """A number in [0, 1) that depends on the text only; it decides the split."""
        return hash_fraction(self.text)


def hash_fraction(text: str) -> float:
    """Map a text to [0, 1) with SHA-256, so splits and orders never depend on the run."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------


def stdlib_source_files(stdlib: Path) -> list[Path]:
    """The standard library's ``.py`` files, sorted, without the skipped directories."""
    files = []
    for path in stdlib.rglob("*.py"):
        parts = path.relative_to(stdlib).parts
        if any(part in SKIPPED_STDLIB_DIRS or part.startswith("config-") for part in parts[:-1]):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def module_name(stdlib: Path, path: Path) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
    parts = list(path.relative_to(stdlib).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def iter_docstrings(tree: ast.Module, module: str) -> Iterator[Document]:
    """Module, class and function docstrings in source order, with dotted names."""

    def visit(node: ast.AST, prefix: str) -> Iterator[Document]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                docstring = ast.get_docstring(child, clean=True)
                if docstring:
                    kind = "class" if isinstance(child, ast.ClassDef) else "function"
                    yield Document(name, kind, normalise_whitespace(docstring))
                yield from visit(child, name)
            elif not isinstance(child, ast.expr):
                # Definitions nested in if/try/with blocks still belong to the same scope.
                yield from visit(child, prefix)

    docstring = ast.get_docstring(tree, clean=True)
    if docstring:
        yield Document(module, "module", normalise_whitespace(docstring))
    yield from visit(tree, module)


def build_corpus(stdlib: Path, min_words: int) -> list[Document]:
    """All distinct docstrings of at least ``min_words`` words, in source order."""
    documents: list[Document] = []
    seen: set[str] = set()
    for path in stdlib_source_files(stdlib):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for document in iter_docstrings(tree, module_name(stdlib, path)):
            if len(document.text.split()) < min_words or document.text in seen:
                continue
            seen.add(document.text)
            documents.append(document)
    return documents


def split_corpus(
    documents: Sequence[Document], heldout_fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, held-out) by the hash of each text; both keep the source order."""
    train = [d for d in documents if d.split_key >= heldout_fraction]
    heldout = [d for d in documents if d.split_key < heldout_fraction]
    return train, heldout


def cap_by_size(
    documents: Sequence[Document], max_bytes: int, size_of: Callable[[Document], int]
) -> list[Document]:
    """The documents, chosen in hash order while their sizes add up to at most ``max_bytes``,
    returned in source order."""
    chosen: set[int] = set()
    total = 0
    for index in sorted(range(len(documents)), key=lambda i: documents[i].split_key):
        size = size_of(documents[index])
        if total + size > max_bytes:
            break
        chosen.add(index)
        total += size
    return [d for i, d in enumerate(documents) if i in chosen]


# --------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------


def jsonl_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(jsonl_line(record) for record in records)


def train_record(document: Document) -> dict:
    return {"name": document.name, "kind": document.kind, "text": document.text}


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8"))


def heldout_text(documents: Sequence[Document]) -> str:
    """The held-out file's content: documents separated by blank lines."""
    return "\n\n".join(d.text for d in documents) + "\n"


def calibration_records(
    train: Sequence[Document], tokenizer: PreTrainedTokenizerFast, min_tokens: int, count: int
) -> list[dict]:
    """Training documents of at least ``min_tokens`` tokens, in hash order.

    Taken from the training split so that calibrating a pruning run never looks at the
    held-out text that its perplexity is measured on.
    """
    records = []
    for document in sorted(train, key=lambda d: d.split_key):
        if len(tokenizer(document.text, verbose=False)["input_ids"]) >= min_tokens:
            records.append({"text": document.text})
            if len(records) == count:
                break
    return records


def first_sentence(text: str) -> str:
    end = text.find(". ")
    return text if end == -1 else text[: end + 1]


def alpaca_records(train: Sequence[Document], count: int, max_words: int) -> list[dict]:
    """Alpaca-style records made from class and function docstrings.

    Two in three ask to explain a name (output: its docstring); one in three asks to
    summarise a docstring given as input (output: its first sentence).
    """
    candidates = [
        d
        for d in sorted(train, key=lambda d: hash_fraction("alpaca:" + d.text))
        if d.kind != "module" and len(d.text.split()) <= max_words
    ]
    records = []
    for index, document in enumerate(candidates[:count]):
        if index % 3 == 2:
            records.append(
                {
                    "instruction": "Summarize the following documentation in one sentence.",
                    "input": document.text,
                    "output": first_sentence(document.text),
                }
            )
        else:
            records.append(
                {
                    "instruction": f"Explain what `{document.name}` does.",
                    "input": "",
                    "output": document.text,
                }
            )
    return records


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer whose ``tokenizer(text)`` prepends ``<s>`` (like Llama)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, output: Path) -> None:
    """``save_pretrained``, naming the class ``PreTrainedTokenizerFast`` in the config.

    transformers 5 writes its new name (``TokenizersBackend``), which transformers 4 cannot
    load; both load ``PreTrainedTokenizerFast``. ``<s>`` comes from the post-processor saved
    in ``tokenizer.json``, which both versions apply.
    """
    tokenizer.save_pretrained(output)
    config_path = output / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Model, training, evaluation
# --------------------------------------------------------------------------------------


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=512,
        attention_dropout=args.attention_dropout,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """``tokenizer(text)`` as one long 1-D tensor (``<s>`` first, no other special token)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def sample_batch(
    stream: torch.Tensor, bos_id: int, batch_size: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """Random ``seq_len``-token windows of the stream; half of them start with ``<s>``.

    Pruning code draws calibration windows both ways (``<s>`` on the first window only or on
    every window), so the model is trained to handle windows with and without it.
    """
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=generator)
    batch = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
    with_bos = torch.rand(batch_size, generator=generator) < 0.5
    batch[with_bos, 0] = bos_id
    return batch


@torch.no_grad()
def perplexity(
    model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, batch_size: int = 32
) -> float:
    """Perplexity over the non-overlapping ``seq_len``-token windows of ``stream``.

    The tail shorter than a window is dropped; every window's first token is context only.
    """
    model.eval()
    windows = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def train_model(
    model: LlamaForCausalLM,
    train_stream: torch.Tensor,
    heldout_stream: torch.Tensor,
    bos_id: int,
    args: argparse.Namespace,
) -> list[tuple[int, float, float | None]]:
    """AdamW + warmup/cosine on random windows; returns (step, loss, held-out ppl) logs."""
    generator = torch.Generator().manual_seed(args.seed)
    # Weight decay on matrices (and the tied embedding), not on the RMSNorm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    log: list[tuple[int, float, float | None]] = []
    running_loss, started = 0.0, time.monotonic()
    for step in range(1, args.steps + 1):
        model.train()
        batch = sample_batch(train_stream, bos_id, args.batch_size, args.seq_len, generator)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running_loss += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            mean_loss = running_loss / (step - (log[-1][0] if log else 0))
            running_loss = 0.0
            ppl = None
            if step % args.eval_every == 0 or step == args.steps:
                ppl = perplexity(model, heldout_stream, args.seq_len)
            log.append((step, mean_loss, ppl))
            elapsed = time.monotonic() - started
            message = f"step {step:5d}/{args.steps}  loss {mean_loss:.4f}  lr {scheduler.get_last_lr()[0]:.2e}"
            if ppl is not None:
                message += f"  held-out ppl {ppl:.2f}"
            print(f"{message}  ({elapsed:.0f}s)", flush=True)
    return log


def weights_size_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def write_training_card(output: Path, facts: dict) -> None:
    lines = [
        "# tiny-llama",
        "",
        "A tiny Llama-architecture causal LM (and its byte-level BPE tokenizer) trained from",
        "scratch on Python standard-library docstrings by `scripts/train_tiny_model.py`. It",
        "is the repository's small real model for tests: 12 decoder blocks whose importance",
        "differs, so depth-pruning criteria have something to find. Not useful for anything else.",
        "",
        "| | |",
        "| --- | --- |",
    ]
    lines += [f"| {key} | {value} |" for key, value in facts.items()]
    lines += [
        "",
        "Data files (under `data/`): `stdlib_docs_train.jsonl` (training split),",
        "`stdlib_docs_heldout.txt` (held-out split, documents separated by blank lines),",
        "`calibration.jsonl` (training documents long enough for 128-token windows) and",
        "`alpaca_tiny.jsonl` (instruction records for LoRA tests).",
        "",
        "Held-out perplexity: `tokenizer(text)` of the whole held-out file (one `<s>` first),",
        "cut into non-overlapping 128-token windows, the last partial window dropped.",
        "",
    ]
    (output / "TRAINING.md").write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("models/tiny-llama"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.3)
    parser.add_argument("--attention-dropout", type=float, default=0.1, help="during training only")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=320)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--min-words", type=int, default=40)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--max-train-bytes", type=int, default=3_000_000)
    parser.add_argument("--max-heldout-bytes", type=int, default=200_000)
    parser.add_argument("--calibration-records", type=int, default=300)
    parser.add_argument("--calibration-min-tokens", type=int, default=160)
    parser.add_argument("--alpaca-records", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--max-weights-mb", type=float, default=10.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    # 1. Corpus and split.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = build_corpus(stdlib, args.min_words)
    train, heldout = split_corpus(corpus, args.heldout_fraction)
    train = cap_by_size(
        train, args.max_train_bytes, lambda d: utf8_size(jsonl_line(train_record(d)))
    )
    heldout = cap_by_size(heldout, args.max_heldout_bytes, lambda d: utf8_size(d.text) + 2)
    print(f"corpus: {len(corpus)} docstrings of >= {args.min_words} words from {stdlib}")
    print(f"split: {len(train)} training, {len(heldout)} held-out documents")

    # 2. Tokenizer (training split only).
    tokenizer = train_tokenizer([d.text for d in train], args.vocab_size)
    print(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens")

    # 3. Data files.
    args.data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.data_dir / TRAIN_FILE, [train_record(d) for d in train])
    heldout_content = heldout_text(heldout)
    (args.data_dir / HELDOUT_FILE).write_text(heldout_content, encoding="utf-8", newline="\n")
    calibration = calibration_records(
        train, tokenizer, args.calibration_min_tokens, args.calibration_records
    )
    write_jsonl(args.data_dir / CALIBRATION_FILE, calibration)
    write_jsonl(
        args.data_dir / ALPACA_FILE, alpaca_records(train, args.alpaca_records, max_words=150)
    )
    for name in (TRAIN_FILE, HELDOUT_FILE, CALIBRATION_FILE, ALPACA_FILE):
        print(
            f"wrote {args.data_dir / name} ({(args.data_dir / name).stat().st_size / 1e3:.0f} kB)"
        )

    # 4. Model and training. The training text has the held-out file's layout.
    train_stream = token_stream(tokenizer, heldout_text(train))
    heldout_stream = token_stream(tokenizer, heldout_content)
    print(f"tokens: {train_stream.numel()} training, {heldout_stream.numel()} held-out")
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, args))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} blocks, {n_params} parameters")
    ppl_at_init = perplexity(model, heldout_stream, args.seq_len)
    print(f"held-out ppl at initialisation: {ppl_at_init:.1f}")
    train_started = time.monotonic()
    log = train_model(model, train_stream, heldout_stream, tokenizer.bos_token_id, args)
    train_seconds = time.monotonic() - train_started
    final_ppl = log[-1][2]
    assert final_ppl is not None
    print(f"final held-out perplexity: {final_ppl:.2f} (training {train_seconds:.0f}s)")

    # 5. Save.
    args.output.mkdir(parents=True, exist_ok=True)
    for stale in args.output.glob("*.safetensors"):
        stale.unlink()
    # The saved model has no dropout: it was only a regulariser for the tiny corpus.
    model.config.attention_dropout = 0.0
    model.config.use_cache = True
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.output, safe_serialization=True)
    save_tokenizer(tokenizer, args.output)
    size = weights_size_bytes(args.output)
    if size > args.max_weights_mb * 1e6:
        raise SystemExit(f"weights are {size / 1e6:.2f} MB, above {args.max_weights_mb} MB")
    total_seconds = time.monotonic() - started
    command = "python scripts/train_tiny_model.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    write_training_card(
        args.output,
        {
            "command": f"`{command.strip()}`",
            "seed": args.seed,
            "steps": f"{args.steps} (batch {args.batch_size} x {args.seq_len} tokens)",
            "optimiser": (
                f"AdamW lr {args.lr}, betas (0.9, 0.95), {args.warmup_steps} warmup steps, cosine, "
                f"weight decay {args.weight_decay}, grad clip 1.0; attention dropout "
                f"{args.attention_dropout} while training (0 in the saved config)"
            ),
            "architecture": (
                f"LlamaForCausalLM, {args.layers} blocks, hidden {args.hidden_size}, "
                f"{args.heads} heads / {args.kv_heads} KV heads, intermediate {args.intermediate_size}, tied embeddings"
            ),
            "parameters": f"{n_params:,}",
            "weights": f"{size / 1e6:.2f} MB (float32 safetensors)",
            "tokenizer": f"byte-level BPE, {len(tokenizer)} tokens, `<s>` prepended",
            "data": f"{len(train)} training / {len(heldout)} held-out stdlib docstrings (>= {args.min_words} words)",
            "training tokens": f"{train_stream.numel():,} (held-out {heldout_stream.numel():,})",
            "held-out perplexity": f"{final_ppl:.2f} (at initialisation {ppl_at_init:.0f})",
            "wall time": f"{total_seconds / 60:.1f} min in all, {train_seconds / 60:.1f} min training, {args.threads} CPU threads",
            "environment": f"Python {platform.python_version()}, torch {torch.__version__}",
        },
    )
    print(f"saved {args.output} ({size / 1e6:.2f} MB of weights) in {total_seconds:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
