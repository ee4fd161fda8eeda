"""Celery tasks: thin wrappers that move a job through the job store around an engine call.

The message carries only the job id. The task loads the row, refuses to run anything that
is not 'queued' (so a redelivered message is a no-op), calls the engine with a progress
callback that writes to the job store, publishes the output with a manifest and records the
final status. The engine (torch) is imported inside the task, i.e. in the forked child.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from service import crud
from service.db import make_engine, make_sessionmaker
from shortened.config import Settings, get_settings
from worker.celery_app import RUN_JOB_TASK, app
from worker.engine.errors import Cancelled, EngineError
from worker.engine.progress import Progress

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

log = logging.getLogger(__name__)

# Progress goes to the job store; tqdm bars from transformers/huggingface_hub would only
# clutter the worker log (read when huggingface_hub is first imported, in the child).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Progress is written (and the cancel flag read) at every stage change and every block,
# otherwise at most this often: one cheap UPDATE ... RETURNING per write.
PROGRESS_WRITE_INTERVAL_S = 1.0

_sessionmakers: dict[tuple[int, str], sessionmaker[Session]] = {}


def session_factory(settings: Settings) -> sessionmaker[Session]:
    # Keyed by pid: a connection pool must never be shared across a fork.
    key = (os.getpid(), settings.resolved_database_url)
    if key not in _sessionmakers:
        _sessionmakers[key] = make_sessionmaker(make_engine(settings.resolved_database_url))
    return _sessionmakers[key]


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


class JobReporter:
    """The engine's progress callback for one job: writes stage/progress columns, stage and
    metric events, captured Python warnings, a heartbeat, and raises ``Cancelled`` when the
    job's cancel flag is set."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.stage: str | None = None
        self.last_done = -1
        self.last_write = 0.0
        self.warnings: list[warnings.WarningMessage] = []
        self._seen_warnings: set[str] = set()

    def __call__(self, progress: Progress) -> None:
        events: list[tuple[str, str, dict[str, Any] | None]] = []
        stage_changed = progress.stage != self.stage
        if stage_changed:
            text = f"{progress.stage}: {progress.message}" if progress.message else progress.stage
            events.append(("stage", text, {"stage": progress.stage}))
        if progress.metrics:
            events.append(
                (
                    "metric",
                    progress.message or progress.stage,
                    {"stage": progress.stage, **progress.metrics},
                )
            )
        events.extend(self._pending_warnings())
        block_done = progress.unit == "blocks" and progress.done != self.last_done
        now = time.monotonic()
        if not (
            stage_changed
            or block_done
            or events
            or now - self.last_write >= PROGRESS_WRITE_INTERVAL_S
        ):
            return
        self.stage, self.last_done, self.last_write = progress.stage, progress.done, now
        with self.sessions() as session:
            stop = crud.record_progress(
                session,
                self.job_id,
                stage=progress.stage,
                done=progress.done,
                total=progress.total,
                unit=progress.unit,
                events=events,
            )
        if stop:
            raise Cancelled(f"job {self.job_id} cancelled during {progress.stage}")

    def stage_change(self, stage: str, message: str) -> None:
        self(Progress(stage, message=message))

    def _pending_warnings(self) -> list[tuple[str, str, dict[str, Any] | None]]:
        out: list[tuple[str, str, dict[str, Any] | None]] = []
        while self.warnings:
            w = self.warnings.pop(0)
            text = f"{w.category.__name__}: {w.message}"
            if text in self._seen_warnings:
                continue
            self._seen_warnings.add(text)
            out.append(
                (
                    "warning",
                    text,
                    {"category": w.category.__name__, "source": f"{w.filename}:{w.lineno}"},
                )
            )
        return out

    def flush_warnings(self) -> None:
        events = self._pending_warnings()
        if events:
            with self.sessions() as session:
                for type_, message, data in events:
                    crud.append_event(session, self.job_id, type_, message, data)
                session.commit()


def _run_prune(
    spec: dict[str, Any],
    output_dir: Path,
    reporter: JobReporter,
    store: ArtifactStore,
    settings: Settings,
) -> dict[str, Any]:
    from shortened.specs import PruneSpec

    parsed = PruneSpec.model_validate(spec)
    from worker.engine.prune import prune_model  # torch: imported in the child only

    return prune_model(
        parsed,
        output_dir,
        progress=reporter,
        store=store,
        cache_dir=settings.resolved_model_cache_dir,
    )


ENGINE_CALLS: dict[
    str, Callable[[dict[str, Any], Path, JobReporter, Any, Settings], dict[str, Any]]
] = {
    "prune": _run_prune,
}


def execute_job(job_id: str, settings: Settings | None = None) -> str | None:
    """Run one queued job to a final status; return that status, or None if the job was
    not queued (unknown, cancelled before it started, or already taken by a worker)."""
    from shortened.storage import publish_directory, store_from_settings

    settings = settings or get_settings()
    sessions = session_factory(settings)
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    with sessions() as session:
        job = crud.claim_job(session, job_id, worker_name)
    if job is None:
        log.info("job %s is not queued; nothing to do", job_id)
        return None

    reporter = JobReporter(sessions, job_id)
    work_root = settings.data_dir.resolve() / "tmp"
    work_root.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f"job-{job_id}-", dir=work_root))
    prefix = job_prefix(job_id)
    store: ArtifactStore | None = None
    published = False

    def finish(status: str, message: str, **fields: Any) -> str:
        reporter.flush_warnings()
        with sessions() as session:
            crud.finish_job(session, job_id, status, message=message, **fields)
        return status

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            reporter.warnings = caught
            run = ENGINE_CALLS.get(job.kind)
            if run is None:
                return finish(
                    "failed",
                    f"unsupported job kind {job.kind!r}",
                    error_code="unsupported_kind",
                    error_message=f"unsupported job kind {job.kind!r}",
                )
            store = store_from_settings(settings)
            output_dir = work_dir / "output"
            report = run(job.spec, output_dir, reporter, store, settings)
            # A cancel that arrives while the checkpoint is being saved is still honoured.
            reporter.stage_change("publishing", f"publishing to {prefix}/")
            published = True
            manifest = publish_directory(
                store, output_dir, prefix, extra={"job_id": job_id, "kind": job.kind}
            )
        artifacts = [
            {"name": f["name"], "size": f["size"], "sha256": f["sha256"]} for f in manifest["files"]
        ]
        with sessions() as session:
            crud.append_event(
                session,
                job_id,
                "log",
                f"published {len(artifacts)} files to {prefix}/",
                {"files": len(artifacts)},
            )
            session.commit()
        return finish("succeeded", "succeeded", result=report, artifacts=artifacts)
    except Cancelled:
        return finish("cancelled", "cancelled")
    except EngineError as exc:
        return finish("failed", str(exc), error_code=exc.code, error_message=str(exc))
    except Exception as exc:
        log.exception("job %s failed", job_id)
        message = f"{type(exc).__name__}: {exc}"
        with sessions() as session:
            crud.append_event(
                session, job_id, "log", "traceback", {"traceback": traceback.format_exc()}
            )
            session.commit()
        if published and store is not None:
            try:  # the manifest is written last, so without it nothing looks published
                store.delete_prefix(prefix)
            except Exception:
                log.exception("could not clean up %s", prefix)
        return finish("failed", message, error_code="internal_error", error_message=message)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


@app.task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> None:
    """Run job ``job_id`` (which must be 'queued'); its outcome is recorded in the job store."""
    execute_job(job_id)
