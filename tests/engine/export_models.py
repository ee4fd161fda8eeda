"""Models for the export tests, built here (nothing is downloaded): the repository's tiny
Llama with a chat template, optionally pruned, and tiny random models of every family in the
shape llama.cpp can run them."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened.engine.architectures import keep_blocks
from tests.helpers import CALIBRATION, HELDOUT, TINY_MODEL, tiny_model, tiny_tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
# Blocks kept by the pruned tiny Llama: 3 of 12 removed, as the README's quick start does.
KEPT_TINY = [0, 1, 2, 3, 4, 5, 7, 9, 11]
# Families whose checkpoints ship a SentencePiece tokenizer.model, which llama.cpp's converter
# requires for them.
SENTENCEPIECE_FAMILIES = frozenset({"gemma", "gemma2", "phi3"})


def tiny_llama(path: Path, kept: Sequence[int] | None = None) -> Path:
    """The repository's tiny Llama (with a chat template) in ``path``; ``kept``: pruned to
    those blocks by the engine's block removal."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    tokenizer.chat_template = CHAT_TEMPLATE
    if kept is None:
        path.mkdir(parents=True)
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(TINY_MODEL / name, path / name)
    else:
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
        keep_blocks(model, kept)
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def eval_texts() -> list[str]:
    return [HELDOUT.read_text()]


def calibration_texts(count: int = 64) -> list[str]:
    with CALIBRATION.open() as handle:
        return [json.loads(line)["text"] for _, line in zip(range(count), handle, strict=False)]


def _sentencepiece_model(path: Path, vocab_size: int) -> None:
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(calibration_texts(300)),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    path.write_bytes(buffer.getvalue())


def family_model(model_type: str, path: Path, kept: Sequence[int] | None = None):  # type: ignore[no-untyped-def]
    """A random tiny model of ``model_type`` saved in ``path`` with a tokenizer the converter
    takes, pruned to ``kept``; returns the (pruned) model.

    Shaped so that llama.cpp computes what transformers computes: the vocabulary is the
    tokenizer's (the Gemma3 converter cuts the embedding to it), Gemma3's query scaling is
    its head size (llama.cpp assumes so), and Mistral's and Qwen's sliding windows are wider
    than the test's sequences (llama.cpp has no sliding window for those architectures).
    Gemma2's and Gemma3's windows stay at 4 tokens with their non-periodic layer patterns."""
    overrides: dict = {}
    if model_type not in SENTENCEPIECE_FAMILIES:
        overrides["vocab_size"] = len(tiny_tokenizer())
    if model_type == "gemma3_text":
        overrides["query_pre_attn_scalar"] = 8
    if model_type in ("mistral", "qwen2", "qwen3"):
        overrides["sliding_window"] = 64
    if model_type in ("qwen2_moe", "qwen3_moe"):
        # Every block a mixture of experts, as in every released checkpoint (llama.cpp's
        # qwen2moe/qwen3moe have no dense blocks; export refuses a model that has them).
        overrides.update(decoder_sparse_step=1, mlp_only_layers=[])
    model = tiny_model(model_type, **overrides)
    if kept is not None:
        keep_blocks(model, kept)
    model.save_pretrained(path)
    if model_type in SENTENCEPIECE_FAMILIES:
        _sentencepiece_model(path / "tokenizer.model", model.config.vocab_size)
    else:
        tiny_tokenizer().save_pretrained(path)
    return model
