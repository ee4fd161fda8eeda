"""One exception type per user-facing failure class.

The service maps ``EngineError.code`` to a job's ``error.code``; the CLI prints the message
on one line and exits non-zero.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager


class EngineError(Exception):
    """Base class: a failure the user can act on (bad input, unsupported model, ...)."""

    code = "engine_error"
    retryable = False  # another attempt of the same job may succeed (it resumes)


class ModelNotFound(EngineError):
    code = "model_not_found"


class ModelGated(EngineError):
    """A gated hub model the worker's token may not download (licence not accepted)."""

    code = "model_gated"


class InsufficientMemory(EngineError):
    """The job's planned peak memory exceeds what this worker declares."""

    code = "insufficient_memory"


class UnsupportedArchitecture(EngineError):
    code = "unsupported_architecture"


class InvalidModelConfig(EngineError):
    """The model's config.json is malformed or its numbers are out of bounds."""

    code = "invalid_model_config"


class CalibrationError(EngineError):
    """The calibration data is missing, empty or too short for the requested windows."""

    code = "bad_calibration_data"


class NothingToPrune(EngineError):
    """The target asks for more blocks than the unprotected ones, or for none."""

    code = "nothing_to_prune"


class OutputExists(EngineError):
    code = "output_exists"


class DataError(EngineError):
    """Training or evaluation data is missing, empty or malformed."""

    code = "bad_data"


class Cancelled(EngineError):
    """Raised from a progress callback to stop the engine at the next block or step."""

    code = "cancelled"


class RetrainError(EngineError):
    """Retraining cannot run as asked: LoRA target modules absent from the model, a checkpoint
    directory that holds another run, a precision the method cannot train in."""

    code = "retrain_error"


class TrainingProcessFailed(EngineError):
    """A process of a multi-process training run died (killed, out of memory, a failed
    collective) without an engine error of its own: the attempt stops, and its checkpoints
    let a retried attempt of the same job resume (``retryable``)."""

    code = "training_process_failed"
    retryable = True


class EvalTaskNotFound(EngineError):
    """A zero-shot task name that lm-evaluation-harness (and the include path) does not know."""

    code = "eval_task_not_found"


class NoChatTemplate(EngineError):
    """Data is to be rendered through the model's chat template, and its tokenizer has none."""

    code = "no_chat_template"


class CorruptModel(EngineError):
    """The model's files are there but cannot be read: a truncated or damaged weights file."""

    code = "corrupt_model"


class DeviceUnavailable(EngineError):
    """The requested device does not exist on this machine (no CUDA, no such GPU index)."""

    code = "device_unavailable"


class NonFinite(EngineError):
    """A stage's output holds NaN or infinity: block scores, a candidate's perplexity, a
    training or validation loss, a metric, or the weights about to be saved. Nothing is
    published."""

    code = "non_finite"


class QualityGateFailed(EngineError):
    """The output's perplexity on held-out text exceeds its parent's by more than the spec's
    ``quality_gate.max_ppl_ratio``: a collapsed model, not published."""

    code = "quality_gate"


class StorageError(EngineError):
    """Outputs cannot be written: the disk or artifact store is full, read-only or denied."""

    code = "storage_error"


# The errnos that mean "the place we write to refuses", as opposed to a bug in what we write.
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}
)


def _os_errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    # Rust-backed writers (safetensors) report the OS error only in their message.
    match = re.search(r"\(os error (\d+)\)", str(exc))
    return int(match.group(1)) if match else None


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn a full, read-only or forbidden destination met while ``what`` into StorageError;
    other errors pass through unchanged (they are bugs, not the tenant's storage)."""
    try:
        yield
    except Exception as exc:
        code = _os_errno(exc)
        if code not in STORAGE_ERRNOS:
            raise
        raise StorageError(f"{what} failed: {os.strerror(code)}") from exc
