"""One exception type per user-facing failure class.

The service maps ``EngineError.code`` to a job's ``error.code``; the CLI prints the message
on one line and exits non-zero.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: a failure the user can act on (bad input, unsupported model, ...)."""

    code = "engine_error"


class ModelNotFound(EngineError):
    code = "model_not_found"


class UnsupportedArchitecture(EngineError):
    code = "unsupported_architecture"


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


class EvalTaskNotFound(EngineError):
    """A zero-shot task name that lm-evaluation-harness (and the include path) does not know."""

    code = "eval_task_not_found"
