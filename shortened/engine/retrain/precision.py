"""The numeric precision of a retrain run: the weights' dtype and Trainer's mixed-precision
flags, chosen from the method, the spec's ``dtype`` and the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RetrainError


@dataclass
class Precision:
    """Weights dtype and Trainer mixed-precision flags of one run."""

    weights: torch.dtype
    bf16: bool = False
    fp16: bool = False

    @property
    def label(self) -> str:
        weights = str(self.weights).removeprefix("torch.")
        autocast = "bf16" if self.bf16 else "fp16" if self.fp16 else None
        return f"{weights} weights" + (f", {autocast} autocast" if autocast else "")


def choose_precision(method: str, dtype: str, device: torch.device) -> Precision:
    """CPU: fp32 (bf16 if asked). CUDA, ``auto``: CPT and KD keep fp32 master weights under
    bf16 autocast (fp16 where bf16 is unsupported); LoRA freezes the base in bf16/fp16 and
    trains fp32 adapters under autocast. Full-parameter training with fp16 weights is refused.
    ``method`` is ``lora`` for any adapter-only run (KD with ``kd.lora`` too)."""
    if method != "lora" and dtype == "float16":
        raise RetrainError(
            "full-parameter training (CPT, KD) in float16 weights is unstable; "
            "use dtype auto or bfloat16"
        )
    if device.type != "cuda":
        if dtype == "float16":
            raise RetrainError(
                "float16 training needs a CUDA device; use float32 or bfloat16 on CPU"
            )
        return (
            Precision(torch.bfloat16, bf16=True)
            if dtype == "bfloat16"
            else Precision(torch.float32)
        )
    bf16_ok = torch.cuda.is_bf16_supported()
    if dtype == "float32":
        return Precision(torch.float32)
    if dtype == "bfloat16":
        return Precision(torch.bfloat16, bf16=True)
    if dtype == "float16":
        return Precision(torch.float16, fp16=True)
    half = torch.bfloat16 if bf16_ok else torch.float16
    weights = torch.float32 if method != "lora" else half
    return Precision(weights, bf16=half == torch.bfloat16, fp16=half == torch.float16)
