"""Block importance criteria.

Each criterion is one function ``(ScoringContext) -> CriterionResult`` registered in
``CRITERIA``. Scores are indexed by original block; a lower score means less important,
and ``removal_order`` lists the removable blocks, the first to go first.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shortened.planning import head_chunk_tokens

from .architectures import FamilyAdapter, adapter_for, block_view, keep_blocks
from .checkpoint import ScoreCheckpoint
from .progress import Progress, ProgressCallback, no_progress


@dataclass
class ScoringContext:
    model: nn.Module
    adapter: FamilyAdapter
    windows: torch.Tensor  # [n_samples, seq_len] token ids
    candidates: list[int]  # removable (unprotected) original block indices
    num_blocks: int  # how many will be removed (angular and iterative_ppl depend on it)
    batch_size: int = 4
    progress: ProgressCallback = no_progress
    # taylor: windows per loss (the paper's batch; None: all windows in one loss, its default)
    gradient_batch_size: int | None = None
    # ppl: also score protected blocks (the full profile, as in the paper's figures). The
    # first protected blocks are the most expensive to score, so this is off by default.
    score_all_blocks: bool = False
    # Perplexity criteria save each block's score here and skip blocks already saved.
    checkpoint: ScoreCheckpoint | None = None

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    def batches(self) -> list[torch.Tensor]:
        device = self.model.get_input_embeddings().weight.device  # type: ignore[operator]  # torch/transformers stubs
        return [chunk.to(device) for chunk in self.windows.split(self.batch_size)]


@dataclass
class CriterionResult:
    block_scores: list[float | None]  # one per original block; None where not computed
    removal_order: list[int]
    details: dict[str, Any] = field(default_factory=dict)


# --- shared machinery: capture the hidden states entering each block, continue from one ---


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden, *args[1:]), kwargs


def _nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood, computed in fp32."""
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum"
    )


def nll_from_hidden(
    model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Summed next-token NLL from the final (normed) hidden states, applying the LM head
    (and Gemma 2's logit soft-capping) ``chunk`` tokens at a time: by default as many as keep
    one call's fp32 logits within ``shortened.planning.HEAD_CHUNK_BYTES``. The full
    [batch, seq, vocab] logits with their log-softmax would otherwise be the largest
    allocation of a scoring pass (a tenth of a 1B model's weights at 4 x 64 tokens with a
    128K vocabulary)."""
    head: Any = model.get_output_embeddings()  # type: ignore[operator]
    # A vision-language model keeps the soft-capping in its text config.
    cap = getattr(model.config, "final_logit_softcapping", None) or getattr(
        getattr(model.config, "text_config", None), "final_logit_softcapping", None
    )
    chunk = chunk or head_chunk_tokens(head.weight.shape[0])
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, states.shape[0], chunk):
        logits = head(states[start : start + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        total += nn.functional.cross_entropy(
            logits, targets[start : start + chunk], reduction="sum"
        )
    return total


def _final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    decoder: Any = model.get_decoder()  # type: ignore[operator]
    return decoder(input_ids=input_ids, use_cache=False).last_hidden_state


def _token_count(windows: torch.Tensor) -> int:
    return windows.shape[0] * (windows.shape[1] - 1)


def capture_block_inputs(
    model: nn.Module, adapter: FamilyAdapter, input_ids: torch.Tensor, active: Sequence[int]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward through the ``active`` blocks. Returns the hidden states entering each
    active block followed by the one entering the final norm, and the summed NLL."""
    captured: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(_hidden_of(args, kwargs).detach())

    layers = adapter.layers(model)
    targets = [layers[i] for i in active] + [adapter.final_norm(model)]
    hooks = [target.register_forward_pre_hook(grab, with_kwargs=True) for target in targets]
    try:
        with block_view(model, active):
            hidden = _final_hidden(model, input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured, nll_from_hidden(model, hidden, input_ids)


def nll_continuing_from(
    model: nn.Module,
    adapter: FamilyAdapter,
    input_ids: torch.Tensor,
    hidden: torch.Tensor,
    remaining: Sequence[int],
) -> torch.Tensor:
    """Summed NLL when ``hidden`` enters block ``remaining[0]`` (or the final norm when
    empty) and runs through ``remaining``: the earlier blocks are not recomputed."""
    target = adapter.layers(model)[remaining[0]] if remaining else adapter.final_norm(model)

    def inject(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _with_hidden(args, kwargs, hidden)

    hook = target.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        with block_view(model, remaining):
            hidden = _final_hidden(model, input_ids)
    finally:
        hook.remove()
    return nll_from_hidden(model, hidden, input_ids)


def _run_from(
    model: nn.Module,
    adapter: FamilyAdapter,
    input_ids: torch.Tensor,
    hidden: torch.Tensor | None,
    blocks: Sequence[int],
) -> torch.Tensor:
    """The hidden state entering the final norm after ``blocks`` run on ``hidden`` (on the
    embeddings when ``hidden`` is None): a decoder forward through those blocks only."""
    layers = adapter.layers(model)
    captured: list[torch.Tensor] = []

    def inject(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        assert hidden is not None  # only registered when there is a state to inject
        return _with_hidden(args, kwargs, hidden)

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(_hidden_of(args, kwargs).detach())

    hooks = [adapter.final_norm(model).register_forward_pre_hook(grab, with_kwargs=True)]
    if hidden is not None:
        entry = layers[blocks[0]] if blocks else adapter.final_norm(model)
        hooks.insert(0, entry.register_forward_pre_hook(inject, with_kwargs=True))
    try:
        with block_view(model, blocks):
            model.get_decoder()(input_ids=input_ids, use_cache=False)  # type: ignore[operator]  # torch/transformers stubs
    finally:
        for hook in hooks:
            hook.remove()
    return captured[-1]


@torch.no_grad()
def ppl_without_each(
    ctx: ScoringContext,
    active: Sequence[int],
    targets: Sequence[int],
    done_offset: int = 0,
    total: int | None = None,
) -> tuple[dict[int, float], float]:
    """Calibration perplexity of the model made of ``active`` blocks with each of ``targets``
    removed in turn, and the perplexity with none removed.

    One pass walks the blocks in order, keeping only the hidden state entering the current
    block: removing block i is scored by continuing from that state through blocks
    i+1..N, then the state is advanced through block i. Every block before i is computed
    once in all, so the cost is about half of rebuilding the model per block, and the only
    activations held besides one forward's are a single hidden state per calibration batch
    (not one per block).

    With ``ctx.checkpoint``, each score is saved as soon as it is computed (before progress
    is reported, which may stop the run) and scores saved by an earlier run are reused.
    """
    active = list(active)
    scope = ScoreCheckpoint.scope_of(active)
    saved = ctx.checkpoint.scores(scope) if ctx.checkpoint else {}
    baseline = ctx.checkpoint.baseline(scope) if ctx.checkpoint else None
    model, adapter = ctx.model, ctx.adapter
    batches = ctx.batches()
    tokens = _token_count(ctx.windows)
    wanted = set(targets)
    missing = [block for block in active if block in wanted and block not in saved]
    total = total if total is not None else len(targets)
    scores: dict[int, float] = {}
    count = 0

    def report(block: int, resumed: bool) -> None:
        nonlocal count
        count += 1
        metrics: dict[str, Any] = {"block": block, "ppl": scores[block]}
        if resumed:
            metrics["resumed"] = True
        ctx.progress(Progress("scoring", done_offset + count, total, "blocks", metrics=metrics))

    states: list[torch.Tensor | None] = [None] * len(batches)  # None: the embeddings
    needs_pass = baseline is None or bool(missing)
    for position, block in enumerate(active):
        if block in wanted and block not in saved:
            remaining = active[position + 1 :]
            nll = 0.0
            for index, batch in enumerate(batches):
                hidden = states[index]
                if hidden is None:  # the first block: start from the embeddings
                    hidden = states[index] = _run_from(model, adapter, batch, None, [])
                nll += nll_continuing_from(model, adapter, batch, hidden, remaining).item()
            scores[block] = math.exp(nll / tokens)
            if ctx.checkpoint:
                ctx.checkpoint.save_score(scope, block, scores[block])
            report(block, resumed=False)
        elif block in wanted:
            scores[block] = saved[block]
            report(block, resumed=True)
        later_missing = any(b in wanted and b not in saved for b in active[position + 1 :])
        if needs_pass and (baseline is None or later_missing):
            states = [
                _run_from(model, adapter, batch, state, [block])
                for batch, state in zip(batches, states, strict=True)
            ]
    for block in targets:  # targets not among the active blocks keep their saved scores
        if block not in scores and block in saved:
            scores[block] = saved[block]
            report(block, resumed=True)
    if baseline is None:
        nll = 0.0
        for batch, state in zip(batches, states, strict=True):
            if state is None:  # no active blocks at all
                state = _run_from(model, adapter, batch, None, [])
            nll += nll_continuing_from(model, adapter, batch, state, []).item()
        baseline = math.exp(nll / tokens)
        if ctx.checkpoint:
            ctx.checkpoint.save_baseline(scope, baseline)
    return scores, baseline


def _ascending(candidates: Sequence[int], scores: Sequence[float | None]) -> list[int]:
    return sorted(candidates, key=lambda block: (scores[block], block))


# --- the criteria ---


def ppl(ctx: ScoringContext) -> CriterionResult:
    """PPL (Kim et al. 2024, Shortened LLaMA, Sec. 3.1 and ``anal_block_sensitivity_ppl.py``):
    block i's score is the calibration perplexity of the model without block i,
    ``exp(mean NLL)`` over every next-token prediction of every window. Protected blocks are
    scored only with ``score_all_blocks`` (their score is None otherwise)."""
    all_blocks = list(range(ctx.num_layers))
    targets = all_blocks if ctx.score_all_blocks else ctx.candidates
    scores, baseline = ppl_without_each(ctx, all_blocks, targets)
    block_scores = [scores.get(i) for i in all_blocks]
    return CriterionResult(
        block_scores, _ascending(ctx.candidates, block_scores), {"baseline_ppl": baseline}
    )


def iterative_ppl(ctx: ScoringContext) -> CriterionResult:
    """SLEB-style greedy removal: remove the block whose removal hurts perplexity least,
    re-score the remaining candidates on the pruned model, repeat."""
    active = list(range(ctx.num_layers))
    block_scores: list[float | None] = [None] * ctx.num_layers
    removed: list[int] = []
    rounds = []
    total = sum(len(ctx.candidates) - r for r in range(ctx.num_blocks))
    done = 0
    baseline = None
    for _ in range(ctx.num_blocks):
        targets = [block for block in ctx.candidates if block in active]
        scores, round_baseline = ppl_without_each(ctx, active, targets, done, total)
        done += len(targets)
        baseline = round_baseline if baseline is None else baseline
        for block, score in scores.items():
            block_scores[block] = score
        best = min(targets, key=lambda block: (scores[block], block))
        removed.append(best)
        active.remove(best)
        rounds.append({"removed": best, "ppl": scores[best]})
    rest = _ascending([b for b in ctx.candidates if b not in removed], block_scores)
    return CriterionResult(
        block_scores, removed + rest, {"baseline_ppl": baseline, "rounds": rounds}
    )


# Parameters that are additive terms, not weights: never scored (the paper's code scores
# ``"weight" in name``, which leaves biases out). gpt-oss's attention sinks are a learned
# logit per head, added like a bias.
_ADDITIVE = ("bias", "sinks")


def _block_weights(block: nn.Module) -> list[nn.Parameter]:
    """A block's weights as the paper's code selects them, every weight of the block:
    projections and norm weights and, in a mixture-of-experts block, the router and every
    expert's tensors (stored as ``experts.gate_up_proj`` / ``down_proj``, without a
    ``weight`` suffix); biases and other additive terms are not scored. Dense blocks hold
    only ``...weight`` and ``...bias`` parameters, so their selection is the paper's."""
    return [
        param
        for name, param in block.named_parameters()
        if not name.rsplit(".", 1)[-1].endswith(_ADDITIVE)
    ]


def taylor(ctx: ScoringContext) -> CriterionResult:
    """Taylor+ (Kim et al. 2024, Shortened LLaMA, Sec. 3.1 and ``anal_block_sensitivity_taylor.py``).

    The salience of weight ``w`` is ``w * dL/dw``, summed *signed* over the loss batches
    (``L``: the mean next-token cross-entropy of one batch of windows, the paper's
    ``model(x, labels=x).loss``). A weight matrix's score is ``sum_i sum_j |s_ij|`` (element-wise
    absolute value, L1 over each output row, summed over rows; norm_power 1, weight and block
    reduction ``sum``); a norm weight's is ``sum_i |s_i|``. A block's score is the sum over its
    weights (biases excluded, as the paper's ``"weight" in name``). Embeddings and the LM head
    are not blocks and are not scored.

    Loss batches are ``gradient_batch_size`` windows (default: all of them, the paper's
    10-of-10). Each is computed in forwards of ``batch_size`` windows whose gradients add up
    in ``param.grad`` (scaled by the loss batch's token count, so the sum is that batch's exact
    gradient): since ``sum_b w * g_b = w * sum_b g_b`` the gradient buffer is the only
    accumulator, one per block weight in the model's dtype. With a single forward in all, each
    weight's salience is reduced the moment its gradient is complete and the gradient freed,
    so no full gradient is ever held.
    """
    model = ctx.model
    layers = ctx.adapter.layers(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    owner: dict[int, int] = {}
    block_scores: list[float | None] = [0.0] * len(layers)
    device = model.get_input_embeddings().weight.device  # type: ignore[operator]  # torch/transformers stubs
    forwards = [
        (chunk, loss_batch.shape[0] * (loss_batch.shape[1] - 1))
        for loss_batch in ctx.windows.split(ctx.gradient_batch_size or ctx.windows.shape[0])
        for chunk in loss_batch.split(ctx.batch_size)
    ]
    last_forward = False

    def reduce(param: torch.Tensor) -> None:
        if not last_forward:  # more gradient to come: it keeps adding up in param.grad
            return
        salience = torch.mul(param.detach(), param.grad).abs_()  # type: ignore[arg-type]
        block_scores[owner[id(param)]] += salience.sum(dtype=torch.float64).item()  # type: ignore[operator]
        param.grad = None

    hooks = []
    for block_index, block in enumerate(layers):
        for param in _block_weights(block):
            param.requires_grad_(True)
            owner[id(param)] = block_index
            hooks.append(param.register_post_accumulate_grad_hook(reduce))
    try:
        for count, (chunk, loss_tokens) in enumerate(forwards, 1):
            last_forward = count == len(forwards)
            chunk = chunk.to(device)
            logits = model(input_ids=chunk, use_cache=False).logits
            (_nll_sum(logits, chunk) / loss_tokens).backward()
            del logits
            ctx.progress(Progress("scoring", count, len(forwards), "batches"))
    finally:
        for hook in hooks:
            hook.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
            param.grad = None
    return CriterionResult(block_scores, _ascending(ctx.candidates, block_scores))


@torch.no_grad()
def magnitude(ctx: ScoringContext) -> CriterionResult:
    """Magnitude (the paper's baseline, ``anal_block_sensitivity_magnitude.py``): Taylor+'s
    aggregation applied to ``|w|`` -- a block's score is ``sum |w|`` over its weights (norm
    weights included, biases excluded). Uses no data."""
    layers = ctx.adapter.layers(ctx.model)
    block_scores: list[float | None] = []
    for block_index, block in enumerate(layers):
        block_scores.append(
            sum(p.abs().sum(dtype=torch.float64).item() for p in _block_weights(block))
        )
        ctx.progress(Progress("scoring", block_index + 1, len(layers), "blocks"))
    return CriterionResult(block_scores, _ascending(ctx.candidates, block_scores))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@torch.no_grad()
def _hidden_profile(ctx: ScoringContext) -> list[list[torch.Tensor]]:
    """Per batch, the hidden states entering each block and the final norm (N+1 tensors)."""
    all_blocks = list(range(ctx.num_layers))
    profile = []
    batches = ctx.batches()
    for count, batch in enumerate(batches, 1):
        profile.append(capture_block_inputs(ctx.model, ctx.adapter, batch, all_blocks)[0])
        ctx.progress(Progress("scoring", count, len(batches), "batches"))
    return profile


def block_influence(ctx: ScoringContext) -> CriterionResult:
    """Block Influence (Men et al. 2024, ShortGPT, Eq. 3): ``BI_i = 1 - E_{X,t} cos(x_{i,t},
    x_{i+1,t})`` with ``x_i`` the hidden state entering block i and ``x_{i+1}`` the one leaving
    it (for the last block: entering the final norm), the mean over every token of every
    calibration window."""
    profile = _hidden_profile(ctx)
    block_scores: list[float | None] = []
    for block in range(ctx.num_layers):
        sims = torch.cat(
            [_cosine(states[block], states[block + 1]).flatten() for states in profile]
        )
        block_scores.append(1.0 - sims.mean().item())
    return CriterionResult(block_scores, _ascending(ctx.candidates, block_scores))


def _angular_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample, arccos(cos(a, b)) / pi at the last token (Gromov et al.)."""
    return torch.arccos(_cosine(a[:, -1], b[:, -1]).clamp(-1.0, 1.0)) / math.pi


def angular(ctx: ScoringContext) -> CriterionResult:
    """Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
    Layers", Eq. 7): ``d(x^l, x^(l+n)) = arccos(cos(x^l_T, x^(l+n)_T)) / pi`` between the hidden
    states entering block l and block l+n (or the final norm) at the last token T, averaged over
    the calibration windows; the contiguous run of n = ``num_blocks`` removable blocks with the
    smallest distance is removed. Per-block scores are the n=1 distances."""
    profile = _hidden_profile(ctx)

    def distance(start: int, length: int) -> float:
        per_sample = torch.cat(
            [_angular_distances(states[start], states[start + length]) for states in profile]
        )
        return per_sample.mean().item()

    block_scores: list[float | None] = [distance(block, 1) for block in range(ctx.num_layers)]
    n = ctx.num_blocks
    removable = set(ctx.candidates)
    runs = {
        start: distance(start, n)
        for start in range(ctx.num_layers - n + 1)
        if set(range(start, start + n)) <= removable
    }
    if not runs:  # candidates are not contiguous enough: fall back to single-block distances
        return CriterionResult(
            block_scores, _ascending(ctx.candidates, block_scores), {"run_start": None}
        )
    start = min(runs, key=lambda s: (runs[s], s))
    run = list(range(start, start + n))
    rest = _ascending([b for b in ctx.candidates if b not in run], block_scores)
    return CriterionResult(
        block_scores, run + rest, {"run_start": start, "run_distance": runs[start]}
    )


# Bumped whenever a criterion's definition changes, so cached scores of the old definition
# are never reused (the score cache key carries it). 2: taylor takes |.| element-wise (was
# per row after summing w*g), magnitude and taylor score weights only (not biases), angular
# averages over windows (was a mean of per-batch means).
CRITERION_VERSIONS: dict[str, int] = {
    "ppl": 1,
    "taylor": 2,
    "magnitude": 2,
    "block_influence": 1,
    "angular": 2,
    "iterative_ppl": 1,
}

CRITERIA: dict[str, Callable[[ScoringContext], CriterionResult]] = {
    "ppl": ppl,
    "taylor": taylor,
    "magnitude": magnitude,
    "block_influence": block_influence,
    "angular": angular,
    "iterative_ppl": iterative_ppl,
}


# --- reference implementation, for tests and benchmarks only ---


@torch.no_grad()
def ppl_scores_naive(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> list[float]:
    """The structure of the paper's code: deep-copy the model without block i and run a full
    forward, for every i. Quadratic compute and a second model in memory."""
    num_layers = adapter_for(model).num_layers(model)
    device = model.get_input_embeddings().weight.device  # type: ignore[operator]  # torch/transformers stubs
    tokens = _token_count(windows)
    scores = []
    for block in range(num_layers):
        pruned = copy.deepcopy(model)
        keep_blocks(pruned, [i for i in range(num_layers) if i != block])
        nll = sum(
            _nll_sum(
                pruned(input_ids=chunk.to(device), use_cache=False).logits, chunk.to(device)
            ).item()
            for chunk in windows.split(batch_size)
        )
        scores.append(math.exp(nll / tokens))
        del pruned
    return scores
