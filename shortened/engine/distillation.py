"""Knowledge distillation from the unpruned parent (Minitron; Hinton et al. 2015).

The loss of one batch, over the positions whose label the LM loss counts::

    alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE(z_student)

Both terms are sums over those positions divided by one token count (Trainer's
``num_items_in_batch`` when it gives one, so gradient accumulation weighs every token
alike). The vocabulary logits are never held for the whole batch: both models' final hidden
states are projected through their own output head a chunk of positions at a time, and each
chunk is recomputed in the backward pass (activation checkpointing), so at most one chunk of
``[positions x vocab]`` per model is alive at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from .errors import RetrainError
from .retrain_data import IGNORE_INDEX


@dataclass(frozen=True)
class KdLoss:
    """What the distillation loss needs besides the two models' outputs."""

    alpha: float = 1.0
    temperature: float = 1.0
    chunk_size: int = 256


@dataclass
class KdTerms:
    """Sums over the counted positions of one batch: the loss is ``mix(count)``."""

    kl: torch.Tensor
    ce: torch.Tensor
    count: torch.Tensor

    def mix(self, loss: KdLoss, denominator: torch.Tensor | float) -> torch.Tensor:
        kd = self.kl * loss.temperature**2
        return (loss.alpha * kd + (1.0 - loss.alpha) * self.ce) / denominator


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The vocabulary logits of final hidden states, as the model's own forward makes them
    (Gemma 2/3 cap them with tanh)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def kd_terms(
    student: Any,
    teacher: Any,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    labels: torch.Tensor,
    loss: KdLoss,
) -> KdTerms:
    """KL and CE sums over the positions that predict a counted label (``labels`` is the
    unshifted ``[batch, seq]`` tensor, ``IGNORE_INDEX`` where the LM loss skips)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    student_rows = student_hidden[:, :-1][keep]
    teacher_rows = teacher_hidden[:, :-1][keep].detach()
    targets = targets[keep]
    temperature = loss.temperature

    def chunk_terms(
        s_rows: torch.Tensor, t_rows: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z_student = head_logits(student, s_rows).float()
        with torch.no_grad():
            z_teacher = head_logits(teacher, t_rows).float()
        ce = F.cross_entropy(z_student, y, reduction="sum")
        log_student = F.log_softmax(z_student / temperature, dim=-1)
        log_teacher = F.log_softmax(z_teacher / temperature, dim=-1)
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")
        return kl, ce

    kl = student_hidden.new_zeros((), dtype=torch.float32)
    ce = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), loss.chunk_size):
        stop = start + loss.chunk_size
        parts = (student_rows[start:stop], teacher_rows[start:stop], targets[start:stop])
        if torch.is_grad_enabled() and student_rows.requires_grad:
            # Recompute the chunk's logits in backward instead of keeping every chunk's.
            chunk_kl, chunk_ce = checkpoint(chunk_terms, *parts, use_reentrant=False)
        else:
            chunk_kl, chunk_ce = chunk_terms(*parts)
        kl, ce = kl + chunk_kl, ce + chunk_ce
    return KdTerms(kl, ce, keep.sum())


def final_hidden(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The last (normed) hidden states, through the model's own (possibly wrapped) forward;
    ``logits_to_keep=1`` keeps the forward from projecting every position onto the vocabulary."""
    outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return outputs.hidden_states[-1]


class DistillationTrainer(Trainer):
    """Trainer whose loss is the distillation loss against a frozen teacher."""

    # compute_loss divides by the accumulated step's token count (or does the accumulation
    # division itself), so Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, teacher: Any, kd_loss: KdLoss, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.kd_loss = kd_loss

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        student_hidden = final_hidden(model, inputs)
        with torch.no_grad():
            teacher_hidden = final_hidden(self.teacher, inputs)
        terms = kd_terms(
            self.accelerator.unwrap_model(model),
            self.teacher,
            student_hidden,
            teacher_hidden,
            labels,
            self.kd_loss,
        )
        if num_items_in_batch is not None:
            denominator: Any = num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # The count is over every process and DDP averages their gradients.
                denominator = num_items_in_batch / self.args.world_size
        else:
            steps = self.current_gradient_accumulation_steps if model.training else 1
            denominator = terms.count.clamp(min=1) * steps
        loss = terms.mix(self.kd_loss, denominator)
        return (loss, {"loss": loss}) if return_outputs else loss


def load_teacher(model: Any) -> Any:
    """A frozen teacher: eval mode (no dropout), no gradients, no KV cache."""
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def check_same_vocabulary(
    student: Any, student_tokenizer: Any, teacher: Any, teacher_tokenizer: Any, teacher_name: str
) -> None:
    """The teacher's distribution is only a target if both models number the same tokens alike."""
    sizes = (student.config.vocab_size, teacher.config.vocab_size)
    if sizes[0] != sizes[1]:
        raise RetrainError(
            f"teacher {teacher_name!r} has a vocabulary of {sizes[1]} tokens, the student "
            f"{sizes[0]}: distillation needs the same tokenizer (use the unpruned parent)"
        )
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(
            token
            for token in student_vocab.keys() | teacher_vocab.keys()
            if student_vocab.get(token) != teacher_vocab.get(token)
        )
        raise RetrainError(
            f"teacher {teacher_name!r} has a different tokenizer: {len(differing)} tokens differ "
            f"(e.g. {differing[:3]}); distillation needs the same tokenizer (use the unpruned parent)"
        )
