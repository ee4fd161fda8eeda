"""Perplexity with the paper's protocol (shortened-llm's eval_ppl.py): the evaluation text (a
named set or a file) is concatenated, tokenized once and cut into non-overlapping windows of
``seq_len`` tokens, BOS once at the start of the stream (default) or at the start of every
window (Gemma); PPL = exp(mean token NLL) over every predicted token of every window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import NAMED_TEXTS, PerplexitySpec

from ..calibration import fetch_data_file, read_documents, read_text
from ..errors import CalibrationError, DataError
from ..models import input_device
from ..progress import Progress, ProgressCallback, no_progress

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore


@dataclass
class EvalText:
    name: str
    text: str
    origin: str


def load_eval_text(
    name: str, spec: PerplexitySpec, *, store: ArtifactStore | None, cache_dir: Path | None
) -> EvalText:
    """The text of a named set (documents joined with blank lines, as the paper) or of a file:
    a .txt file as is, .jsonl/.json/.parquet records' ``field`` joined with blank lines."""
    if name in NAMED_TEXTS:
        dataset, config, split, field = NAMED_TEXTS[name]
        records = _load_named_split(name, dataset, config, split)
        return EvalText(name, "\n\n".join(records[field]), f"hf:{dataset}/{config}:{split}")
    path = fetch_data_file(name, store=store, cache_dir=cache_dir)
    if not path.is_file():
        raise DataError(
            f"perplexity text {name!r} is neither a named set ({', '.join(NAMED_TEXTS)}) nor an existing file"
        )
    if path.suffix.lower() == ".txt":
        text = read_text(path, DataError)
    else:
        try:
            text = "\n\n".join(read_documents(path, spec.field))
        except CalibrationError as exc:
            raise DataError(str(exc)) from exc
    if not text.strip():
        raise DataError(f"perplexity text {path.name} is empty")
    return EvalText(name, text, str(path))


def _load_named_split(name: str, dataset: str, config: str, split: str) -> Any:
    """The split from the hub; datasets >= 4 cannot run loading scripts (ptb_text_only has
    one), so a script-based set is read from the hub's parquet conversion branch instead."""
    from datasets import load_dataset

    errors = []
    for revision in (None, "refs/convert/parquet"):
        try:
            return load_dataset(dataset, config, split=split, revision=revision)
        except Exception as exc:  # datasets raises many types (offline, moved, script-based)
            errors.append(f"{type(exc).__name__}: {exc}")
            if "script" not in str(exc).lower():
                break
    raise DataError(
        f"cannot load perplexity set {name!r} (HF {dataset}/{config}, split {split}): "
        f"{'; '.join(errors)}; give a local text file instead"
    )


def perplexity_windows(
    token_ids: list[int], seq_len: int, bos_token_id: int | None, bos_every_window: bool
) -> torch.Tensor:
    """``[n, seq_len]`` non-overlapping windows of the token stream (tail dropped). BOS is put
    once before the stream, or before every window of ``seq_len - 1`` text tokens."""
    if bos_every_window:
        if bos_token_id is None:
            raise DataError("bos_every_window is set but the tokenizer has no BOS token")
        body = seq_len - 1
        n = len(token_ids) // body
        windows = [[bos_token_id, *token_ids[i * body : (i + 1) * body]] for i in range(n)]
    else:
        stream = ([bos_token_id] if bos_token_id is not None else []) + list(token_ids)
        n = len(stream) // seq_len
        windows = [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    if not windows:
        raise DataError(
            f"the text has {len(token_ids)} tokens: not enough for one window of {seq_len}"
        )
    return torch.tensor(windows, dtype=torch.long)


@torch.no_grad()
def window_nll(
    model: Any,
    windows: torch.Tensor,
    batch_size: int,
    progress: ProgressCallback = no_progress,
    label: str = "",
) -> torch.Tensor:
    """Per-token negative log-likelihoods (float64, flattened) of every predicted token."""
    device = input_device(model)
    nlls = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        # No KV cache: nothing is generated, and under ``block_view`` the attention layers
        # keep their original layer_idx, which a cache sized for fewer layers would reject.
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1, :].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="none"
        )
        nlls.append(nll.double().cpu())
        progress(
            Progress(
                "perplexity",
                min(start + batch_size, len(windows)),
                len(windows),
                "windows",
                message=label,
            )
        )
    return torch.cat(nlls)


def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    texts: list[EvalText],
    spec: PerplexitySpec,
    progress: ProgressCallback,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for item in texts:
        ids = tokenizer(item.text, add_special_tokens=False, verbose=False)["input_ids"]
        windows = perplexity_windows(
            ids, spec.seq_len, tokenizer.bos_token_id, spec.bos_every_window
        )
        if spec.max_windows is not None:
            windows = windows[: spec.max_windows]
        nll = window_nll(model, windows, spec.batch_size, progress, item.name)
        mean = float(nll.mean())
        results[item.name] = {
            "ppl": math.exp(mean),
            "mean_nll": mean,
            "windows": len(windows),
            "predicted_tokens": int(nll.numel()),
            "text_tokens": len(ids),
            "seq_len": spec.seq_len,
            "bos_every_window": spec.bos_every_window,
            "origin": item.origin,
        }
        n = len(windows)
        progress(
            Progress(
                "perplexity",
                n,
                n,
                "windows",
                message=item.name,
                metrics={"ppl": results[item.name]["ppl"]},
            )
        )
    return results
