"""The export's user-facing failures, as engine errors with their own codes (the service maps
``code`` to a job's ``error.code``): a target that cannot be made for this model or machine,
and an artifact that its own runtime cannot load or that lost too much quality."""

from __future__ import annotations

from ..errors import EngineError


class UnsupportedExportTarget(EngineError):
    """An unknown target, a family without a runtime architecture for it, a missing install."""

    code = "unsupported_export_target"


class ExportVerificationFailed(EngineError):
    """An artifact did not load in its runtime, or its perplexity exceeds the tolerance."""

    code = "export_verification_failed"
