"""The memory this worker declares, and the check that a job's plan fits it before any
weights are loaded.

A worker's memory is ``SHORTENED_WORKER_MEMORY_GB`` when set, else the total memory of its
first visible GPU when CUDA is present, else unknown (no check: a CPU worker shares its RAM
with whatever else runs there, so only an operator can say how much a job may take). The API
refuses what no worker can hold from ``SHORTENED_MAX_WORKER_MEMORY_GB``, the largest of these;
this check catches a job that reached a smaller worker than the largest.
"""

from __future__ import annotations

import logging
from typing import Any

from shortened.config import Settings
from shortened.engine.errors import InsufficientMemory

log = logging.getLogger(__name__)


def declared_memory_bytes(settings: Settings) -> int | None:
    """This worker's memory in bytes (see the module docstring), or None when unknown."""
    if settings.worker_memory_gb is not None:
        return int(settings.worker_memory_gb * 10**9)
    import torch  # the task's child process only: the worker parent stays torch-free

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def declared_devices(settings: Settings) -> int:
    """This worker's devices: ``SHORTENED_WORKER_DEVICES``, else its visible CUDA devices,
    else one."""
    if settings.worker_devices is not None:
        return settings.worker_devices
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def check_fits(kind: str, spec: dict[str, Any], settings: Settings) -> None:
    """Raise ``InsufficientMemory`` when the job's planned peak exceeds this worker's memory.
    A model whose config is not readable here yet (a hub model) is not checked."""
    from shortened.admission import Lookups, Missing, Unknown, model_config
    from shortened.kinds import parse_spec, plan_job
    from shortened.planning import insufficient_memory
    from shortened.retrain_memory import resolve_processes

    limit = declared_memory_bytes(settings)
    if limit is None:
        return
    devices = declared_devices(settings)
    parsed = resolve_processes(parse_spec(kind, spec), devices)
    model = getattr(parsed, "model", None)
    if not isinstance(model, str) or ("://" in model and not model.startswith("file://")):
        return  # remote sources: their config is read when the engine resolves them
    try:
        config = model_config(model, Lookups())
        plan = plan_job(kind, parsed, config, settings.worker_device) if config else None
    except (Missing, Unknown, KeyError, TypeError, ValueError):
        return
    if plan is None:
        return
    if message := insufficient_memory(plan, limit, devices):
        raise InsufficientMemory(message.replace("the largest worker", "this worker"))
    log.info("planned peak %.1f GB of the %.1f GB declared", plan.peak_bytes / 1e9, limit / 1e9)
