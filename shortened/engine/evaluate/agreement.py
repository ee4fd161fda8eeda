"""Next-token agreement of a pruned model with its parent on held-out prompts.

Perplexity says how well a model predicts text; for an instruct model pruned from a parent,
the closer question is how often it would say what the parent says. On each prompt (a
record without its answer, rendered through the chat template by default: ``chat.py``)
both models' next-token distributions are compared at every position:

* ``top1``: the share of positions where the two argmax tokens are the same;
* ``mean_kl``: the mean over positions of ``KL(parent || model) = sum_v p(v) (log p(v) -
  log q(v))``, ``p`` the parent's softmax and ``q`` the model's, in fp32 from the logits.

Both models are held at once while prompts are compared (as knowledge distillation holds
student and teacher); the parent is loaded after the model's own sections are measured, so
their memory figures are the model's alone.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import AgreementSpec

from ..calibration import fetch_data_file, read_records
from ..chat import chat_ids, prompt_part, record_messages, render_chat, require_chat_template
from ..errors import DataError
from ..models import input_device, load_model
from ..progress import Progress, ProgressCallback, no_progress
from ..retrain_data import alpaca_prompt

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore


def load_prompt_records(
    spec: AgreementSpec, *, store: ArtifactStore | None, cache_dir: Path | None
) -> list[dict[str, Any]]:
    """The first ``max_prompts`` records of the prompt file (read before any model loads, so
    a bad file fails fast)."""
    path = fetch_data_file(spec.prompts, store=store, cache_dir=cache_dir)
    return read_records(path, spec.field)[: spec.max_prompts]


def prompt_text(record: dict[str, Any], tokenizer: Any, spec: AgreementSpec, where: str) -> str:
    """A record as the prompt the models are compared on: without its answer. With
    ``chat_template`` the conversation up to its last non-assistant turn, rendered with the
    generation prompt; otherwise Alpaca records' prompt, or the text."""
    if spec.chat_template:
        messages = prompt_part(record_messages(record, spec.field, where))
        if not messages:
            raise DataError(f"{where}: the chat has no turn before the assistant's answer")
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    if "messages" in record:
        raise DataError(f"{where}: 'messages' records need agreement.chat_template")
    if "instruction" in record and "output" in record:
        return alpaca_prompt(str(record["instruction"]), str(record.get("input") or ""))
    if spec.field not in record:
        raise DataError(f"{where}: no field {spec.field!r} (has {sorted(record)})")
    return str(record[spec.field])


def prompt_token_ids(
    records: list[dict[str, Any]], tokenizer: Any, spec: AgreementSpec
) -> list[list[int]]:
    """Each prompt's token ids, cut to ``max_tokens``: rendered chats without the tokenizer's
    special tokens (the template wrote them), plain prompts with them."""
    if spec.chat_template:
        require_chat_template(tokenizer, "agreement")
    prompts = []
    for index, record in enumerate(records, 1):
        text = prompt_text(record, tokenizer, spec, f"prompt {index}")
        if spec.chat_template:
            ids = chat_ids(tokenizer, text)
        else:
            ids = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
        if ids:
            prompts.append(ids[: spec.max_tokens])
    if not prompts:
        raise DataError("the agreement prompts hold no tokens")
    return prompts


def token_agreement(
    parent_logits: torch.Tensor, model_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (``[..., vocab]`` logits of the same positions): whether the argmax
    tokens agree, and KL(parent || model) of the softmax distributions, in fp32."""
    if parent_logits.shape != model_logits.shape:
        raise DataError(
            f"the model's and its parent's vocabularies differ ({model_logits.shape[-1]} and "
            f"{parent_logits.shape[-1]} logits): agreement needs the same tokenizer"
        )
    log_p = torch.log_softmax(parent_logits.float(), dim=-1)
    log_q = torch.log_softmax(model_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    same = parent_logits.argmax(dim=-1) == model_logits.argmax(dim=-1)
    return same, kl


@torch.no_grad()
def next_token_agreement(
    model: Any,
    parent: Any,
    prompts: list[list[int]],
    batch_size: int,
    progress: ProgressCallback = no_progress,
) -> dict[str, Any]:
    """Top-1 agreement and mean KL(parent || model) over every position of every prompt.
    Prompts are batched right-padded with an attention mask; padded positions are not
    counted (a causal model's logits at real positions do not see the padding)."""
    model_device, parent_device = input_device(model), input_device(parent)
    agree = positions = 0
    kl_sum = 0.0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(batch):
            ids[row, : len(prompt)] = torch.tensor(prompt)
            mask[row, : len(prompt)] = 1
        real = mask.bool()
        # No KV cache: nothing is generated (and a pruned model's attention layers keep
        # their original indices).
        parent_logits = parent(
            input_ids=ids.to(parent_device), attention_mask=mask.to(parent_device), use_cache=False
        ).logits[real.to(parent_device)]
        model_logits = model(
            input_ids=ids.to(model_device), attention_mask=mask.to(model_device), use_cache=False
        ).logits[real.to(model_device)]
        same, kl = token_agreement(parent_logits.to(model_logits.device), model_logits)
        agree += int(same.sum())
        kl_sum += float(kl.double().sum())
        positions += int(real.sum())
        done = min(start + batch_size, len(prompts))
        progress(Progress("agreement", done, len(prompts), "prompts"))
    return {
        "top1": agree / positions,
        "mean_kl": kl_sum / positions,
        "positions": positions,
        "prompts": len(prompts),
    }


def measure_agreement(
    model: Any,
    tokenizer: Any,
    parent_source: str,
    spec: AgreementSpec,
    records: list[dict[str, Any]],
    *,
    dtype: str,
    device: str,
    store: ArtifactStore | None,
    cache_dir: Path | None,
    progress: ProgressCallback = no_progress,
) -> dict[str, Any]:
    """The agreement section of the report: the prompts tokenized with the model's
    tokenizer, the parent loaded beside the model, compared, and released."""
    prompts = prompt_token_ids(records, tokenizer, spec)
    progress(Progress("loading", message=f"{parent_source} (agreement)"))
    parent = load_model(parent_source, dtype=dtype, device=device, store=store, cache_dir=cache_dir)
    try:
        result = next_token_agreement(model, parent.model, prompts, spec.batch_size, progress)
    finally:
        # Freed before the baseline's own evaluation loads it again.
        del parent
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {
        **result,
        "parent": parent_source,
        "chat_template": spec.chat_template,
        "max_tokens": spec.max_tokens,
        "origin": spec.prompts,
    }
