"""What every engine run writes the same way: an output directory that appears only when
complete, a model saved in its checkpoint's own precision, per-phase timings and the library
versions of the report."""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from shortened.permissions import as_if_created

from .errors import OutputExists, storage_errors


def check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise OutputExists(f"output directory {str(output_dir)!r} exists and is not empty")


@contextmanager
def atomic_output_dir(output_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``output_dir``; move it into place only on success.

    The directory gets the permissions a plain ``mkdir`` would (the user's umask), not the
    0700 of a temporary directory. A disk that refuses the writes is ``StorageError``."""
    check_output_dir(output_dir)
    with storage_errors("writing the outputs"):
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent)
        )
        try:
            yield staging
            check_output_dir(output_dir)
            as_if_created(staging)
            if output_dir.exists():
                output_dir.rmdir()
            staging.rename(output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# Shard size when neither the spec nor the source checkpoint says: the Hub's customary size
# (transformers' own default, 50GB, would write a 16 GB model as one file that no tool can
# fetch or resume in parts).
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def shard_size_bytes(size: str | int) -> int:
    """``"2GB"`` (decimal units, as transformers reads them; KiB/MiB/GiB binary) or bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * _SIZE_UNITS[unit])
    if text.isdigit():
        return int(text)
    raise ValueError(f"not a size: {size!r} (expected e.g. 500MB or 5GB)")


def source_shard_size(path: str | Path) -> int | None:
    """The largest shard of a sharded safetensors checkpoint, in bytes (None: one file, or
    not a local directory), so the output is cut the way its source was."""
    index = Path(path) / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = {Path(path) / name for name in weight_map.values()}
        return max(shard.stat().st_size for shard in shards) if len(shards) > 1 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_model(
    model: Any,
    tokenizer: Any,
    path: Path,
    source_dtype: torch.dtype | None,
    *,
    restore_dtype: bool = True,
    max_shard_size: str | int | None = None,
    processor: Any = None,
) -> None:
    """save_pretrained in the source checkpoint's precision, so a float32 run on a bfloat16
    checkpoint does not double its size on disk, as safetensors shards of at most
    ``max_shard_size`` (default: ``DEFAULT_MAX_SHARD_SIZE``) with their index.
    ``restore_dtype``: cast the model back afterwards (a caller that goes on using it)."""
    current = next(model.parameters()).dtype
    cast = source_dtype is not None and source_dtype != current
    if cast:
        model.to(source_dtype)
    with quiet_progress_bars():
        model.save_pretrained(path, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
        # A vision-language model's processor saves its tokenizer with the image processor.
        (processor if processor is not None else tokenizer).save_pretrained(path)
    if cast and restore_dtype:
        model.to(current)


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' own bars ("Writing model shards", "Loading weights") off: progress is the
    caller's to report (stage lines, the job's events), and a bar redrawn into a log is noise."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class PhaseTimer:
    """Seconds per phase of a run: ``timer("load_s")`` records the time since the previous
    mark (or the start) under that name."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.started = self._clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 3)
        self._clock = now

    def total(self) -> float:
        """Seconds since the timer started."""
        return round(time.perf_counter() - self.started, 3)


def library_versions() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
