"""The quality gate: a published model's perplexity on held-out text against its parent's.

Depth pruning can collapse a model (too many blocks, the wrong ones), and training can
wreck one while every number stays finite. Before a prune, search or retrain job saves its
output, the output and its parent are measured on the same held-out windows; an output
whose perplexity exceeds ``quality_gate.max_ppl_ratio`` times its parent's fails the job
with ``quality_gate`` (``QualityGateFailed``), and the ratio is in the report otherwise.

Held-out text, by stage:

* prune: calibration documents the scoring windows were *not* drawn from, in file order,
  joined and cut into non-overlapping windows (the perplexity protocol, as search's
  validation windows, which ``held_out_windows`` also makes);
* search: its validation windows (the ones that rank the candidates);
* retrain: the first items of the validation split, else of the training data (then they
  are not held out: the gate detects a collapse, not overfitting).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shortened.specs import CalibrationSpec, QualityGateSpec

from .calibration import calibration_documents  # noqa: F401  (re-exported: prune, search)
from .errors import QualityGateFailed
from .evaluate import perplexity_windows, window_nll
from .finite import check_finite
from .models import input_device
from .retrain_data import IGNORE_INDEX


def held_out_windows(
    documents: Sequence[str],
    indices: Iterable[int],
    tokenizer: Any,
    calibration: CalibrationSpec,
    max_windows: int,
) -> torch.Tensor:
    """The documents at ``indices`` (in that order, empty ones skipped) joined with blank
    lines and cut into non-overlapping ``calibration.seq_len`` windows, the first
    ``max_windows``; ``DataError`` when they make none. Only as many documents are read as
    the windows need (plus a window's worth, so the cut never falls on the last one's end)."""
    needed = (max_windows + 1) * calibration.seq_len
    chosen: list[str] = []
    count = 0
    for index in indices:
        document = documents[index]
        if not document.strip():
            continue
        chosen.append(document)
        count += len(tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"])
        if count >= needed:
            break
    ids = tokenizer("\n\n".join(chosen), add_special_tokens=False, verbose=False)["input_ids"]
    windows = perplexity_windows(
        ids, calibration.seq_len, tokenizer.bos_token_id, calibration.add_bos_to_every
    )
    return windows[:max_windows]


def windows_perplexity(model: Any, windows: torch.Tensor, batch_size: int) -> float:
    """exp(mean token NLL) of the windows."""
    return _exp(float(window_nll(model, windows, batch_size).mean()))


def _exp(mean_nll: float) -> float:
    """exp, infinity where it overflows (NaN stays NaN): the gate's finite check reports it."""
    return math.inf if mean_nll > 709 else math.exp(mean_nll)


@torch.no_grad()
def items_perplexity(model: Any, items: list[dict[str, Any]]) -> float:
    """exp(mean NLL) over the counted labels of training items (``input_ids`` and
    ``labels`` lists; ``IGNORE_INDEX`` where the loss skips), in eval mode, one at a time."""
    was_training = model.training
    model.eval()
    device = input_device(model)
    total, tokens = 0.0, 0
    try:
        for item in items:
            ids = torch.tensor([item["input_ids"]], device=device)
            labels = torch.tensor([item["labels"]], device=device)[:, 1:]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += float(nll)
            tokens += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return _exp(total / max(tokens, 1))


def first_items(dataset: Any, count: int) -> list[dict[str, Any]]:
    """The first ``count`` items of a map-style or streamed dataset."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return [dataset[i] for i in range(min(count, len(dataset)))]
    return list(itertools.islice(iter(dataset), count))


@dataclass
class Gate:
    """A gate measured on the parent, waiting for the output: what ``judge`` compares."""

    spec: QualityGateSpec
    parent_ppl: float
    windows: int
    source: str  # where the held-out windows came from
    seconds: float  # time spent measuring so far


def unmeasured(spec: QualityGateSpec, reason: str) -> dict[str, Any]:
    """The report section of a gate that could not be measured (no held-out text)."""
    return {"max_ppl_ratio": spec.max_ppl_ratio, "measured": False, "reason": reason}


def measure_parent(spec: QualityGateSpec, measure: Any, windows: int, source: str) -> Gate | None:
    """The parent's held-out perplexity (``measure()``), or None with the gate off."""
    if spec.max_ppl_ratio is None:
        return None
    clock = time.perf_counter()
    parent_ppl = measure()
    check_finite(parent_ppl, "the parent model's held-out perplexity")
    return Gate(spec, parent_ppl, windows, source, time.perf_counter() - clock)


def judge(gate: Gate, measure: Any, what: str) -> dict[str, Any]:
    """The output's held-out perplexity (``measure()``) against the parent's: the report's
    ``quality_gate`` section, or ``QualityGateFailed`` above the ratio (``NonFinite`` if not
    finite)."""
    clock = time.perf_counter()
    ppl = measure()
    check_finite(ppl, f"the {what}'s held-out perplexity")
    ratio = ppl / gate.parent_ppl
    limit = gate.spec.max_ppl_ratio
    assert limit is not None
    section = {
        "max_ppl_ratio": limit,
        "measured": True,
        "windows": gate.windows,
        "window_source": gate.source,
        "parent_ppl": gate.parent_ppl,
        "ppl": ppl,
        "ppl_ratio": round(ratio, 6),
        "passed": ratio <= limit,
        "cost_s": round(gate.seconds + time.perf_counter() - clock, 3),
    }
    if ratio > limit:
        raise QualityGateFailed(
            f"the {what}'s perplexity on {gate.windows} held-out windows ({gate.source}) is "
            f"{ppl:.4g}, {ratio:.3g} times its parent's {gate.parent_ppl:.4g}, over "
            f"quality_gate.max_ppl_ratio {limit:g}: the model collapsed and was not saved "
            "(remove fewer blocks, or set max_ppl_ratio to null to publish it anyway)"
        )
    return section


def gate_fields(section: dict[str, Any]) -> dict[str, Any]:
    """The report's gate fields: the section, and its ratio at the top level (the job
    result's summary in webhooks and the batch table read it there)."""
    return {"quality_gate": section, "ppl_ratio": section.get("ppl_ratio")}
