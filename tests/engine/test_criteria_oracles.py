"""Every criterion against an oracle written from its paper's definition, on the repository's
trained tiny model (models/tiny-llama) and calibration windows drawn the paper's way.

The oracles use plain transformers calls (a rebuilt model, ``labels=`` losses, forward hooks):
nothing from ``shortened.engine.criteria`` but the criterion under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from shortened.engine.architectures import adapter_for
from shortened.engine.criteria import CRITERIA, ScoringContext
from tests.helpers import tiny_model, trained_tiny

N_SAMPLES, SEQ_LEN = 10, 48


@pytest.fixture(scope="module")
def setup():
    model, _, windows = trained_tiny(N_SAMPLES, SEQ_LEN)
    return model, windows


def score(model, windows, criterion, *, candidates=None, num_blocks=1, batch_size=4, **kwargs):
    adapter = adapter_for(model)
    n = adapter.num_layers(model)
    candidates = list(range(n)) if candidates is None else candidates
    context = ScoringContext(
        model, adapter, windows, candidates, num_blocks, batch_size=batch_size, **kwargs
    )
    return CRITERIA[criterion](context)


def block_io(model, windows):
    """Per block, the hidden states entering and leaving it ([n_samples, seq, hidden] each)."""
    inputs, outputs = [], []

    def grab(_module, args, kwargs, output):
        inputs.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        outputs.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layer.register_forward_hook(grab, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, outputs


def test_ppl_is_perplexity_without_the_block(setup):
    """Kim et al. 2024 (Shortened LLaMA), Sec. 3.1, PPL criterion, as ``anal_block_sensitivity_ppl.py``:
    the model rebuilt without block i; each window run alone, the token-wise cross-entropy of the
    shifted logits concatenated over windows; score = exp(mean)."""
    model, windows = setup
    engine = score(model, windows, "ppl", score_all_blocks=True).block_scores
    num_layers = len(model.model.layers)
    loss_fct = nn.CrossEntropyLoss(reduction="none")
    for block in range(num_layers):
        pruned = copy.deepcopy(model)
        pruned.model.layers = nn.ModuleList(
            layer for i, layer in enumerate(pruned.model.layers) if i != block
        )
        pruned.config.num_hidden_layers = num_layers - 1
        nlls = []
        with torch.no_grad():
            for x in windows:
                logits = pruned(x.unsqueeze(0), use_cache=False).logits
                nlls.append(loss_fct(logits[0, :-1], x[1:]))
        expected = math.exp(torch.cat(nlls).mean().item())
        assert engine[block] == pytest.approx(expected, rel=1e-4), block


def taylor_plus_oracle(model, windows, loss_batch):
    """Kim et al. 2024 (Shortened LLaMA), Sec. 3.1, Taylor+ (Eq. for I_Taylor with |.| taken
    element-wise), as ``anal_block_sensitivity_taylor.py`` with norm_power 1 and "sum" weight and
    block reductions: salience w * dL/dw summed signed over loss batches (L: mean loss of the
    batch), then sum of |salience| over every weight of the block (norm weights included,
    biases, embeddings and the LM head excluded)."""
    reference = copy.deepcopy(model)
    salience: dict[str, torch.Tensor] = {}
    for batch in windows.split(loss_batch):
        reference(batch, labels=batch, use_cache=False).loss.backward()
        for name, param in reference.named_parameters():
            if name.startswith("model.layers.") and name.endswith("weight"):
                s = (param * param.grad).detach()
                salience[name] = salience[name] + s if name in salience else s
        reference.zero_grad()
    scores = [0.0] * len(reference.model.layers)
    for name, s in salience.items():
        scores[int(name.split(".")[2])] += s.abs().sum().item()
    return scores


@pytest.mark.parametrize(
    ("loss_batch", "batch_size"),
    [(None, 10), (None, 4), (4, 4), (5, 3)],
    ids=[
        "one-batch-one-forward",
        "one-batch-microbatched",
        "batches-of-4",
        "batches-of-5-microbatched",
    ],
)
def test_taylor_plus_is_elementwise_abs_salience(setup, loss_batch, batch_size):
    """Taylor+ of Kim et al. 2024 (Sec. 3.1): see ``taylor_plus_oracle``. The paper's default
    batch is all 10 windows in one loss; other loss batches sum their saliences."""
    model, windows = setup
    engine = score(
        model, windows, "taylor", batch_size=batch_size, gradient_batch_size=loss_batch
    ).block_scores
    expected = taylor_plus_oracle(model, windows, loss_batch or len(windows))
    for block, value in enumerate(expected):
        assert engine[block] == pytest.approx(value, rel=1e-4), block
    # Not the per-row |sum_j w_ij g_ij| of the earlier definition (which cancels within rows).
    assert all(p.grad is None for p in model.parameters())


def test_taylor_plus_holds_no_full_gradient_with_one_forward(setup):
    """With one forward, each weight's gradient is reduced and freed as soon as it is complete:
    at no point do two block weights hold a gradient."""
    model, windows = setup
    weights = [
        p
        for layer in model.model.layers
        for n, p in layer.named_parameters()
        if n.endswith("weight")
    ]
    most = 0

    def count(_param):
        nonlocal most
        most = max(most, sum(p.grad is not None for p in weights))

    hooks = [
        p.register_post_accumulate_grad_hook(count) for p in weights
    ]  # run before the engine's
    try:
        score(model, windows, "taylor", batch_size=N_SAMPLES)
    finally:
        for hook in hooks:
            hook.remove()
    assert most == 1


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_magnitude_is_sum_of_absolute_weights(setup, model_type):
    """Kim et al. 2024 (Shortened LLaMA), magnitude baseline, as
    ``anal_block_sensitivity_magnitude.py``: Taylor+'s reductions applied to |w| -- projections
    |w| summed per output row then over rows, norm weights |w| summed; biases (Qwen2's q/k/v)
    are not weights and are not counted."""
    model = setup[0] if model_type == "llama" else tiny_model("qwen2")
    engine = score(model, torch.empty((0, 0), dtype=torch.long), "magnitude").block_scores
    expected = [0.0] * len(model.model.layers)
    for name, param in model.named_parameters():
        if name.startswith("model.layers.") and "weight" in name:
            per_row = param.abs().sum(1) if "proj" in name else param.abs()
            expected[int(name.split(".")[2])] += per_row.sum(0).item()
    for block, value in enumerate(expected):
        assert engine[block] == pytest.approx(value, rel=1e-6), block


def test_block_influence_is_one_minus_input_output_cosine(setup):
    """Men et al. 2024 (ShortGPT), Eq. 3: BI_i = 1 - E_{X,t} [x_{i,t} . x_{i+1,t} /
    (|x_{i,t}| |x_{i+1,t}|)], x_i the block's input and x_{i+1} its output, averaged over
    every token of every window."""
    model, windows = setup
    engine = score(model, windows, "block_influence").block_scores
    inputs, outputs = block_io(model, windows)
    for block, (x_in, x_out) in enumerate(zip(inputs, outputs, strict=True)):
        cos = (x_in * x_out).sum(-1) / (x_in.norm(dim=-1) * x_out.norm(dim=-1))
        assert engine[block] == pytest.approx(1 - cos.mean().item(), abs=1e-5), block


@pytest.mark.parametrize("n", [1, 2, 3])
def test_angular_distance_picks_the_closest_contiguous_run(setup, n):
    """Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"), Eq. 7:
    d(x^l, x^(l+n)) = arccos(x^l_T . x^(l+n)_T / (|x^l_T| |x^(l+n)_T|)) / pi at the last token
    T, averaged over the windows; l* = argmin over runs of n blocks, blocks l .. l+n-1 removed.
    x^l is block l's input and x^(l+n) block l+n-1's output. 10 windows in batches of 4: the
    mean is over windows, not over batch means."""
    model, windows = setup
    num_layers = len(model.model.layers)
    candidates = list(range(1, num_layers - 1))
    result = score(model, windows, "angular", candidates=candidates, num_blocks=n)
    inputs, outputs = block_io(model, windows)

    def distance(start: int, length: int) -> float:
        a, b = inputs[start][:, -1], outputs[start + length - 1][:, -1]
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        return (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()

    for block in range(num_layers):
        assert result.block_scores[block] == pytest.approx(distance(block, 1), abs=1e-5), block
    runs = {start: distance(start, n) for start in candidates if start + n - 1 in candidates}
    best = min(runs, key=runs.get)
    assert result.removal_order[:n] == list(range(best, best + n))
    assert result.details["run_distance"] == pytest.approx(runs[best], abs=1e-5)
