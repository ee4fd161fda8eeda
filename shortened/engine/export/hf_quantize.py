"""HF checkpoint -> quantized HF checkpoint (compressed-tensors), for vLLM, TGI and transformers.

Written by AutoRound (Intel's SignRound: rounding and clipping tuned by signed gradient
descent on the calibration texts, block by block) and saved in the compressed-tensors format
(AutoRound's ``llm_compressor`` export), which vLLM and TGI load natively and transformers
loads through its compressed-tensors integration. Schemes are AutoRound's presets: W4A16 and
W8A16 (integer weights in groups, 16-bit activations), INT8_W8A8 (per-channel weights, dynamic
per-token activations) and FP8 (only where a GPU computes in FP8).
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError, DeviceUnavailable
from .errors import UnsupportedExportTarget
from .formats import HF_QUANTIZED, ExportFormat

log = logging.getLogger(__name__)

AUTOROUND_EXPORT = "llm_compressor"  # AutoRound's name for the compressed-tensors format
GROUP_SIZES = (128, 64, 32)  # preferred first: AutoRound's (and vLLM kernels') default is 128
GROUPED_SCHEMES = frozenset({"W4A16", "W8A16"})


def fp8_gpu_reason() -> str | None:
    """None when a GPU here computes in FP8 (compute capability 8.9+: Ada, Hopper, later);
    otherwise why FP8 cannot be made and verified on this machine."""
    if not torch.cuda.is_available():
        return (
            "FP8 needs a CUDA GPU with FP8 support (compute capability 8.9+); this machine has none"
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name()
        return f"FP8 needs compute capability 8.9+; {name} is {major}.{minor}"
    return None


def pick_group_size(model: Any) -> int:
    """The largest of ``GROUP_SIZES`` that divides the input width of every linear layer that
    gets quantized (all but the LM head): a group may not straddle two rows."""
    widths = {
        module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    for size in GROUP_SIZES:
        if all(width % size == 0 for width in widths):
            return size
    raise UnsupportedExportTarget(
        f"no quantization group size of {GROUP_SIZES} divides the layer widths {sorted(widths)}"
    )


@contextmanager
def _cheap_garbage_collection() -> Any:
    """AutoRound runs ``gc.collect()`` after every block; with transformers and torch loaded
    each full collection takes a quarter of a second. Freezing what exists before quantizing
    (libraries, the model) keeps it out of those collections."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def quantize_checkpoint(
    model_dir: Path,
    fmt: ExportFormat,
    dest_dir: Path,
    calibration_texts: Sequence[str] | None,
    *,
    iters: int = 200,
    n_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    device: str = "auto",
) -> dict[str, Any]:
    """Quantize the checkpoint in ``model_dir`` to ``fmt`` and save it in ``dest_dir``.

    ``iters``: SignRound steps per block (AutoRound's default 200; 0 = rounding to nearest).
    Calibration draws ``n_samples`` windows of ``seq_len`` tokens from ``calibration_texts``.
    Returns the settings used."""
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if fmt.format != HF_QUANTIZED:
        raise ValueError(f"{fmt.name} is not an HF-quantized target")
    if fmt.needs_fp8_gpu and (reason := fp8_gpu_reason()):
        raise DeviceUnavailable(reason)
    texts = [text for text in calibration_texts or [] if text.strip()]
    if not texts:
        raise CalibrationError(f"{fmt.name} is calibrated: give calibration texts")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    target_device = "cuda" if on_gpu else "cpu"

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    options: dict[str, Any] = {}
    if fmt.writer_type in GROUPED_SCHEMES:
        options["group_size"] = pick_group_size(model)
    settings = {
        "scheme": fmt.writer_type,
        "iters": iters,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "device": target_device,
        **options,
    }
    log.info("AutoRound %s on %s", settings, model_dir)
    with tempfile.TemporaryDirectory(prefix=".autoround-", dir=dest_dir.parent) as scratch:
        autoround = AutoRound(
            model,
            tokenizer,
            scheme=fmt.writer_type,
            dataset=texts,
            iters=iters,
            nsamples=n_samples,
            seqlen=seq_len,
            batch_size=batch_size,
            device_map=target_device,
            # Compiling each block costs more than it saves on small models and on CPUs.
            enable_torch_compile=False,
            **options,
        )
        with _cheap_garbage_collection():
            _, folders = autoround.quantize_and_save(scratch, format=AUTOROUND_EXPORT)
        # AutoRound names its own subdirectory after the model and scheme: move its content.
        written = Path(folders[0] if isinstance(folders, list | tuple) else folders)
        shutil.move(str(written), str(dest_dir))
    return settings


def autoround_version() -> str:
    from importlib.metadata import version

    return f"auto-round {version('auto-round')}"


def compressed_tensors_version() -> str:
    from importlib.metadata import version

    return f"compressed-tensors {version('compressed-tensors')}"
