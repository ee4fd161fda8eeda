"""Prometheus metrics of the Celery worker, in prometheus_client's multiprocess mode.

Jobs run in prefork pool children (a fresh one per job, ``worker_max_tasks_per_child=1``), so
their metrics are written to files in ``PROMETHEUS_MULTIPROC_DIR`` and the worker's main
process, which outlives them, serves ``/metrics`` by merging those files
(``MultiProcessCollector``) on ``SHORTENED_WORKER_METRICS_PORT`` (default 9808; 0: off).

Wiring (see ``connect_signals``, called by ``worker.celery_app``):

* ``worker_init`` (main process, before the pool forks): a fresh multiprocess directory;
* ``worker_ready`` (main process): the HTTP server starts (and says so in the log);
* ``worker_process_init`` (each child): the child closes its inherited copy of the listening
  socket;
* ``worker_process_shutdown`` (each child): ``mark_process_dead`` for its live gauges;
* ``worker_shutdown`` (main process): the server stops and the directory is removed.

What the task code reports (``worker.tasks``): ``job_run()`` around a job, ``job_claimed(kind)``
once the job is claimed, ``stage_started(stage)`` at every stage change.

Metrics (all prefixed ``shortened_worker_``): ``jobs_started_total{kind}``,
``jobs_finished_total{kind,outcome}``, ``job_duration_seconds{kind,outcome}`` (histogram,
claim to final status), ``stage_duration_seconds{kind,stage}`` (histogram) and, when CUDA was
used, ``gpu_memory_peak_bytes{kind,device}`` (the last job's ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import contextvars
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from service.multiproc import fresh_directory, use_multiprocess

log = logging.getLogger(__name__)

# Jobs take minutes to a day; stages from a fraction of a second (pruning) to hours (scoring).
JOB_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 57600, 86400)
STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 86400)

JOBS_STARTED = Counter("shortened_worker_jobs_started", "Jobs claimed by this worker", ["kind"])
JOBS_FINISHED = Counter(
    "shortened_worker_jobs_finished",
    "Jobs that ended on this worker, by outcome (succeeded, failed, cancelled, lost, error)",
    ["kind", "outcome"],
)
JOB_DURATION = Histogram(
    "shortened_worker_job_duration_seconds",
    "Wall-clock time of a job attempt, from its claim to its final status",
    ["kind", "outcome"],
    buckets=JOB_BUCKETS,
)
STAGE_DURATION = Histogram(
    "shortened_worker_stage_duration_seconds",
    "Wall-clock time of one stage of a job (loading, calibration, scoring, ..., publishing)",
    ["kind", "stage"],
    buckets=STAGE_BUCKETS,
)
MESSAGES_DROPPED = Counter(
    "shortened_worker_messages_dropped",
    "Job messages dropped in the main process without using a pool slot, by the job's status "
    "(cancelled before it started, already running or finished elsewhere, unknown)",
    ["status"],
)
OUTCOMES = ("succeeded", "failed", "cancelled", "lost", "error")
GPU_MEMORY_PEAK = Gauge(
    "shortened_worker_gpu_memory_peak_bytes",
    "Peak GPU memory allocated by torch during the last job that used the device",
    ["kind", "device"],
    multiprocess_mode="mostrecent",
)


# ---------------------------------------------------------------------------- job tracking


def _job_kinds() -> tuple[str, ...]:
    from shortened.kinds import kind_names

    return kind_names()


@dataclass
class JobRun:
    """One job attempt in this process: its kind once claimed, its stage, its outcome."""

    kind: str | None = None
    started: float = 0.0
    stage: str | None = None
    stage_started: float = 0.0
    outcome: str | None = None

    def close_stage(self, now: float) -> None:
        if self.kind is not None and self.stage is not None:
            STAGE_DURATION.labels(self.kind, self.stage).observe(now - self.stage_started)
        self.stage = None


_current: contextvars.ContextVar[JobRun | None] = contextvars.ContextVar(
    "worker_job_run", default=None
)


@contextmanager
def job_run() -> Iterator[JobRun]:
    """Around one ``execute_job``: set ``run.outcome`` to its return value. Nothing is recorded
    for a job that was not claimed (``job_claimed`` never called); an exception is outcome
    ``error``."""
    run = JobRun()
    token = _current.set(run)
    try:
        yield run
    except BaseException:
        run.outcome = "error"
        raise
    finally:
        _current.reset(token)
        if run.kind is not None:
            now = time.monotonic()
            run.close_stage(now)
            outcome = run.outcome or "error"
            JOB_DURATION.labels(run.kind, outcome).observe(now - run.started)
            JOBS_FINISHED.labels(run.kind, outcome).inc()
            record_gpu_memory(run.kind)


def job_claimed(kind: str) -> None:
    """The job of the current ``job_run`` was claimed: its clock starts now."""
    run = _current.get()
    if run is None:
        return
    run.kind, run.started = kind, time.monotonic()
    JOBS_STARTED.labels(kind).inc()
    _reset_gpu_peak()


def stage_started(stage: str) -> None:
    """The current job entered ``stage``: the previous stage's duration is recorded."""
    run = _current.get()
    if run is None or run.kind is None or run.stage == stage:
        return
    now = time.monotonic()
    run.close_stage(now)
    run.stage, run.stage_started = stage, now


def _cuda() -> Any | None:
    """torch.cuda if this process already imported torch and initialised CUDA, else None
    (never imports torch: the CPU path and the API stay free of it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda
    except Exception:  # a broken driver must not fail the job's bookkeeping
        log.debug("CUDA state unavailable", exc_info=True)
    return None


def _reset_gpu_peak() -> None:
    cuda = _cuda()
    if cuda is not None:
        for index in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(index)


def record_gpu_memory(kind: str) -> None:
    cuda = _cuda()
    if cuda is None:
        return
    try:
        for index in range(cuda.device_count()):
            GPU_MEMORY_PEAK.labels(kind, f"cuda:{index}").set(cuda.max_memory_allocated(index))
    except Exception:
        log.warning("could not read the GPU memory peak", exc_info=True)


# ---------------------------------------------------------------------------- worker process side


@dataclass
class _Serving:
    directory: Path
    owned: bool  # created here (removed at shutdown) rather than given by the environment
    server: Any | None = None
    thread: threading.Thread | None = None


_serving: _Serving | None = None


def prepare(port: int, data_dir: Path) -> _Serving | None:
    """In the main worker process, before the pool forks: a fresh multiprocess directory, and
    this process and its future children switched to multiprocess values."""
    global _serving
    if port <= 0 or _serving is not None:
        return _serving
    directory, owned = fresh_directory(data_dir, "worker")
    use_multiprocess(directory)
    _serving = _Serving(directory, owned)
    # Zeros from the start, so that rate() and absent() work before the first job ends.
    for kind in _job_kinds():
        JOBS_STARTED.labels(kind)
        for outcome in OUTCOMES:
            JOBS_FINISHED.labels(kind, outcome)
    return _serving


def serve(port: int, host: str) -> None:
    """Serve ``/metrics`` (the merged files of every process) from the main worker process.
    A port already in use is logged, not fatal: the worker runs jobs without metrics."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    if _serving is None or _serving.server is not None:
        return
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(_serving.directory))
    try:
        _serving.server, _serving.thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.warning("worker metrics not served: cannot listen on %s:%d: %s", host, port, exc)
    else:
        log.info("worker metrics on http://%s:%d/metrics (%s)", host, port, _serving.directory)


def stop_serving() -> None:
    global _serving
    serving, _serving = _serving, None
    if serving is None:
        return
    if serving.server is not None:
        serving.server.shutdown()
        serving.server.server_close()
    if serving.owned:
        shutil.rmtree(serving.directory, ignore_errors=True)


def _on_worker_init(**_kwargs: Any) -> None:
    from shortened.config import get_settings

    settings = get_settings()
    prepare(settings.worker_metrics_port, settings.data_dir)


def _on_worker_ready(**_kwargs: Any) -> None:
    from shortened.config import get_settings

    settings = get_settings()
    serve(settings.worker_metrics_port, settings.worker_metrics_host)


def _on_child_init(**_kwargs: Any) -> None:
    # The child inherited the listening socket with the fork but not the thread serving it:
    # close its copy, so that only the main process holds the port.
    if _serving is not None and _serving.server is not None:
        _serving.server.socket.close()


def _on_child_shutdown(pid: int | None = None, **_kwargs: Any) -> None:
    if _serving is not None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid or os.getpid(), str(_serving.directory))


def _on_worker_shutdown(**_kwargs: Any) -> None:
    stop_serving()


def connect_signals() -> None:
    from celery import signals

    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_ready.connect(_on_worker_ready, weak=False)
    signals.worker_process_init.connect(_on_child_init, weak=False)
    signals.worker_process_shutdown.connect(_on_child_shutdown, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
