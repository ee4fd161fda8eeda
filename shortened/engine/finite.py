"""The one check that no stage publishes NaN or infinity: ``check_finite`` for what a stage
computed (block scores, candidates' perplexities, losses, metrics), ``check_finite_weights``
for a model about to be saved, and ``non_finite_guard``, the Trainer callback that stops a
training stage at the first optimizer step that leaves a non-finite weight or logs a
non-finite loss. Each raises ``NonFinite`` (job error code ``non_finite``) before anything is
written, so the output directory never appears and the worker publishes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from .errors import NonFinite

# The Trainer log entries that are losses: a non-finite one means the model diverged.
# grad_norm is left out: under fp16 loss scaling an overflowing gradient is expected and the
# step is skipped, leaving the weights as they were.
LOSS_KEYS = ("loss", "eval_loss", "train_loss")


def _non_finite(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of every NaN or infinite number in a JSON-like value or tensor."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int | float):
        if not math.isfinite(value):
            yield path, value
    elif isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = (~torch.isfinite(value.detach())).nonzero()[0].tolist()
            yield f"{path}[{','.join(map(str, bad))}]", value[tuple(bad)].item()
    elif isinstance(value, dict):
        for key, child in value.items():
            yield from _non_finite(child, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for i, child in enumerate(value):
            yield from _non_finite(child, f"{path}[{i}]")


def check_finite(values: Any, what: str) -> None:
    """Raise ``NonFinite`` if ``values`` (a number, a tensor, or dicts and lists of them;
    strings, booleans and None are skipped) holds NaN or infinity, naming where."""
    for path, value in _non_finite(values, ""):
        where = f" ({path} = {value})" if path else f" ({value})"
        raise NonFinite(f"{what} is not finite{where}: the model diverged or is broken")


def check_finite_weights(model: Any, where: str, *, trainable_only: bool = False) -> None:
    """Raise ``NonFinite`` naming the first parameter holding NaN or infinity.

    One reduction per parameter (a float32 sum: NaN and infinity propagate through it, and no
    copy of the weights is made) and one device sync per device, so it costs a read of the
    weights; ``trainable_only`` reads only those an optimizer step can change."""
    params = [
        (name, p)
        for name, p in model.named_parameters()
        if p.device.type != "meta" and (p.requires_grad or not trainable_only)
    ]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    with torch.no_grad():
        for _, p in params:
            by_device.setdefault(p.device, []).append(p.sum(dtype=torch.float32))
        if all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values()):
            return
        for name, p in params:  # the slow path: which one
            if not bool(torch.isfinite(p).all()):
                raise NonFinite(
                    f"weight {name} holds NaN or infinity {where}: the model diverged or is "
                    "broken; nothing was saved"
                )
    # Finite parameters whose sum overflows float32 (|w| near 1e38): broken all the same.
    raise NonFinite(f"the weights overflow float32 {where}: the model is broken")


def non_finite_guard(stage: str) -> Any:
    """A TrainerCallback that raises ``NonFinite`` out of ``trainer.train()`` at the end of the
    first optimizer step leaving a trainable weight non-finite (a non-finite loss makes the
    step's gradients, hence the weights, non-finite), and at the first non-finite training or
    validation loss logged. Raised before the step's checkpoint is saved."""
    from transformers import TrainerCallback

    class _Guard(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
            if model is not None:
                check_finite_weights(
                    model, f"after {stage} step {state.global_step}", trainable_only=True
                )

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            losses = {key: (logs or {}).get(key) for key in LOSS_KEYS}
            check_finite(losses, f"the {stage} loss at step {state.global_step}")

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # type: ignore[no-untyped-def]
            losses = {key: (metrics or {}).get(key) for key in LOSS_KEYS}
            check_finite(losses, f"the {stage} validation loss at step {state.global_step}")

    return _Guard()
