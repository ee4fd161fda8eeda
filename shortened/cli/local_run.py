"""What the commands that run the engine in this process share: the admission checks made
before torch or the model is loaded, the ``--dry-run`` plan, and the run of an engine call
with progress on the terminal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from ..kinds import plan_job
from ..planning import Plan
from .display import TerminalProgress


def admit(kind: str, spec: Any) -> None:
    """Refuse a job that cannot run before torch or the model is loaded (``AdmissionError``:
    one line naming the field). Object storage is asked with a short timeout."""
    from ..admission import Lookups, s3_lookups
    from ..kinds import check_spec

    lookups = s3_lookups() if "s3://" in spec.model_dump_json() else Lookups()
    check_spec(kind, spec, lookups)


def refuse(field: str, message: str) -> NoReturn:
    """Stop the command with one ``error:`` line naming ``field`` (exit code 2)."""
    from ..admission import AdmissionError, Problem

    raise AdmissionError([Problem(field, message)])


def dry_run_plan(kind: str, spec: Any) -> Plan:
    """The plan of ``spec`` from its model's config.json, without torch. ``device auto``
    is planned for the CPU unless CUDA_VISIBLE_DEVICES names a GPU."""
    import os

    from ..admission import Lookups, model_config, s3_lookups

    lookups = s3_lookups() if spec.model.startswith("s3://") else Lookups()
    config = model_config(spec.model, lookups)
    if config is None:
        refuse("model", f"cannot plan {spec.model}: its config.json is not readable here")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    auto_device = "cuda" if visible and visible != "-1" else "cpu"
    plan = plan_job(kind, spec, config, auto_device)
    if plan is None:
        refuse("dry_run", f"{kind} jobs are not planned")
    return plan


def with_progress(run: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``run(*args, progress=..., **kwargs)`` with progress on stderr; its report."""
    progress = TerminalProgress()
    try:
        return run(*args, progress=progress, **kwargs)
    finally:
        progress.close()
