"""Load each exported artifact in the runtime it is meant for and measure it there.

GGUF files run in llama.cpp (llama-cpp-python); HF-quantized checkpoints in transformers
through the format's own integration (compressed-tensors), on the CPU here. Perplexity is the
project's: the evaluation texts joined with blank lines, tokenized once by the HF tokenizer and
cut into the same non-overlapping windows as ``shortened eval`` (``perplexity_windows``); the
same token ids are fed to every runtime, so the numbers differ only by the weights. Speed is
greedy generation at batch 1 with the output length forced, median of timed repeats after a
warm-up. A GGUF file is also checked for what the converter carries over from the tokenizer
files: the same tokens for the same text, the same BOS/EOS ids and the chat template.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..evaluate import perplexity_windows, window_nll

DEFAULT_PROMPT = "Depth pruning removes whole transformer blocks from a language model"


@dataclass
class EvalWindows:
    """The perplexity windows (token ids) and a prompt, shared by every runtime."""

    windows: torch.Tensor | None  # [n, seq_len], or None without evaluation texts
    prompt_ids: list[int]
    sample_text: str  # for the tokenizer check


def build_windows(
    tokenizer: Any,
    eval_texts: Sequence[str] | None,
    *,
    seq_len: int = 128,
    max_windows: int | None = 32,
    bos_every_window: bool = False,
    prompt_tokens: int = 16,
) -> EvalWindows:
    """The windows ``shortened eval`` would use for these texts, and a prompt of
    ``prompt_tokens`` tokens (BOS + the start of the text)."""
    text = "\n\n".join(eval_texts or [])
    source = text if text.strip() else DEFAULT_PROMPT
    ids = tokenizer(source, add_special_tokens=False, verbose=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = (bos + ids)[:prompt_tokens]
    windows = None
    if text.strip():
        windows = perplexity_windows(ids, seq_len, tokenizer.bos_token_id, bos_every_window)
        if max_windows is not None:
            windows = windows[:max_windows]
    return EvalWindows(windows, prompt, source[:4000])


def _nll_to_ppl(nll: torch.Tensor) -> float:
    return math.exp(float(nll.double().mean()))


def _median_rate(run: Any, new_tokens: int, repeats: int) -> float:
    run()  # warm-up: first-call allocations, weight repacking, caches
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return new_tokens / statistics.median(seconds)


# --- llama.cpp --------------------------------------------------------------------------------


@contextmanager
def open_gguf(path: Path, *, n_ctx: int, logits_all: bool = False, threads: int | None = None):  # type: ignore[no-untyped-def]
    """A ``llama_cpp.Llama`` on ``path``, closed on exit."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=logits_all,
        # None: llama-cpp-python's defaults (half the cores to generate, all to evaluate a
        # batch), which hold up better than all cores on a machine shared with other work.
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    try:
        yield llm
    finally:
        llm.close()


def gguf_perplexity(path: Path, windows: torch.Tensor, *, threads: int | None = None) -> float:
    """Perplexity of the GGUF model over ``windows``: each window evaluated from an empty
    context, its logits at every position scored against the next token."""
    seq_len = windows.shape[1]
    nlls = []
    with open_gguf(path, n_ctx=seq_len, logits_all=True, threads=threads) as llm:
        for window in windows.tolist():
            llm.reset()
            llm.eval(window)
            logits = torch.from_numpy(llm.scores[: seq_len - 1].copy()).double()
            targets = torch.tensor(window[1:])
            nlls.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
    return _nll_to_ppl(torch.cat(nlls))


def gguf_greedy(
    path: Path, prompt_ids: Sequence[int], new_tokens: int, *, threads: int | None = None
) -> list[int]:
    """The ``new_tokens`` tokens greedy decoding appends to ``prompt_ids`` (EOS included if
    it comes: the length is forced, as in the speed measurement)."""
    with open_gguf(path, n_ctx=len(prompt_ids) + new_tokens, threads=threads) as llm:
        return _gguf_greedy(llm, prompt_ids, new_tokens)


def _gguf_greedy(llm: Any, prompt_ids: Sequence[int], new_tokens: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(list(prompt_ids), top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == new_tokens:
            break
    return out


def gguf_tokens_per_s(
    path: Path,
    prompt_ids: Sequence[int],
    new_tokens: int,
    *,
    repeats: int = 3,
    threads: int | None = None,
) -> float:
    with open_gguf(path, n_ctx=len(prompt_ids) + new_tokens, threads=threads) as llm:
        return _median_rate(lambda: _gguf_greedy(llm, prompt_ids, new_tokens), new_tokens, repeats)


def gguf_tokenizer_problems(path: Path, tokenizer: Any, sample_text: str) -> list[str]:
    """What the GGUF's tokenizer does differently from the HF one: token ids of a sample text,
    BOS/EOS ids, the chat template. Empty when they agree."""
    problems = []
    with open_gguf(path, n_ctx=64) as llm:
        metadata = llm.metadata
        ids = llm.tokenize(sample_text.encode(), add_bos=False, special=False)
    expected = tokenizer(sample_text, add_special_tokens=False, verbose=False)["input_ids"]
    if list(ids) != list(expected):
        first = next(
            (i for i, (a, b) in enumerate(zip(ids, expected, strict=False)) if a != b), None
        )
        problems.append(
            f"tokenization differs from the HF tokenizer (at token {first}; "
            f"{len(ids)} vs {len(expected)} tokens)"
        )
    for role in ("bos", "eos"):
        hf_id = getattr(tokenizer, f"{role}_token_id")
        gguf_id = metadata.get(f"tokenizer.ggml.{role}_token_id")
        if hf_id is not None and gguf_id is not None and int(gguf_id) != hf_id:
            problems.append(f"{role} token id {gguf_id} instead of {hf_id}")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and metadata.get("tokenizer.chat_template") != template:
        problems.append("the chat template was not carried over")
    return problems


# --- transformers ---------------------------------------------------------------------------


def load_hf(model_dir: Path) -> Any:
    """The checkpoint through transformers (a quantized one through its quantization
    integration), on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    from ..outputs import quiet_progress_bars

    with quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map="cpu")
    return model.eval()


def hf_perplexity(model: Any, windows: torch.Tensor, batch_size: int = 8) -> float:
    return _nll_to_ppl(window_nll(model, windows, batch_size))


@torch.no_grad()
def hf_greedy(model: Any, prompt_ids: Sequence[int], new_tokens: int) -> list[int]:
    input_ids = torch.tensor([list(prompt_ids)])
    output = model.generate(
        input_ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.pad_token_id or 0,
    )
    return [int(token) for token in output[0, len(prompt_ids) :]]


def hf_tokens_per_s(
    model: Any, prompt_ids: Sequence[int], new_tokens: int, *, repeats: int = 3
) -> float:
    return _median_rate(lambda: hf_greedy(model, prompt_ids, new_tokens), new_tokens, repeats)


def quantization_method(model: Any) -> str | None:
    """``quant_method`` of a model transformers loaded as quantized (None: not quantized)."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else config.quant_method
    return str(getattr(method, "value", method)) if method else None


def files_of(directory: Path) -> list[dict[str, Any]]:
    return [
        {"name": str(path.relative_to(directory)), "bytes": path.stat().st_size}
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    ]
