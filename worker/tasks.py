"""Celery tasks: thin wrappers that move a job through the job store around an engine call.

The message carries only the job id. The task claims the job with a compare-and-set
(queued -> running as attempt n, so a redelivered or duplicate message is a no-op), keeps
the attempt's lease alive from a heartbeat thread, calls the engine with a progress
callback that writes to the job store, publishes the output with a manifest, checks the
upload, and records the final status. Every write is fenced by the attempt number: a
worker that lost its lease (the reaper gave the job to another attempt) stops at its next
progress report and never finishes or publishes the job.

The engine (torch) is imported inside the task, i.e. in the forked child.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from service import crud
from service.db import make_engine, make_sessionmaker
from service.locks import session_lock
from service.reaper import job_prefix, scratch_prefix
from service.submission import submit_job
from service.tracing import annotate_job, stage_spans
from shortened.config import Settings, get_settings
from shortened.engine.errors import Cancelled, EngineError, storage_errors
from shortened.engine.progress import Progress, ProgressLines
from shortened.logs import job_context
from shortened.redact import redact_result, spec_strings
from worker import metrics as worker_metrics
from worker.capacity import check_fits
from worker.celery_app import RUN_JOB_TASK, app
from worker.processes import pid_alive, worker_id_for
from worker.tracking import start_tracking

if TYPE_CHECKING:
    from celery import Celery

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


class LeaseLost(Cancelled):
    """This attempt no longer holds the job: stop, publish nothing, record nothing."""

    code = "worker_lost"


class TimeLimitExceeded(Cancelled):
    code = "timeout"


class PublishError(Exception):
    """The store does not hold what was uploaded (missing object, wrong size)."""


class Lease:
    """Renews the attempt's lease every ``heartbeat_interval_s`` from a daemon thread.

    ``held()`` turns False when the job store says the attempt lost the job (re-queued by
    the reaper, finished elsewhere) and also, without asking, when the lease could not be
    renewed for 90% of its TTL (database unreachable): by then the reaper may hand the job
    to another worker, so this one must stop on its own (fencing).
    """

    def __init__(
        self, sessions: sessionmaker[Session], job_id: str, attempt: int, settings: Settings
    ) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt
        self.ttl_s = settings.lease_ttl_s
        self.interval_s = min(settings.heartbeat_interval_s, settings.lease_ttl_s / 3)
        self.renewed_at = time.monotonic()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            # In a copy of the job's context: its log lines carry the job id too.
            target=contextvars.copy_context().run,
            args=(self._run,),
            name=f"lease-{job_id}",
            daemon=True,
        )

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
        self._thread.join(timeout=self.interval_s + 5)

    def stop(self) -> None:
        """No more renewals: the attempt is about to record its end."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.sessions() as session:
                    still_ours = crud.renew_lease(session, self.job_id, self.attempt, self.ttl_s)
            except Exception as exc:  # transient: the local expiry check below decides
                log.warning("job %s: could not renew the lease: %s", self.job_id, exc)
            else:
                if not still_ours:
                    if self._stop.is_set():  # the job just ended: nothing was lost
                        return
                    log.warning("job %s attempt %d lost its lease", self.job_id, self.attempt)
                    self.lost.set()
                    return
                self.renewed_at = time.monotonic()
            if not self.held():
                self.lost.set()
                return

    def held(self) -> bool:
        return not self.lost.is_set() and time.monotonic() - self.renewed_at < 0.9 * self.ttl_s


class JobReporter:
    """The engine's progress callback for one job: writes stage/progress columns, stage and
    metric events, captured Python warnings, a heartbeat, and raises ``Cancelled`` when the
    job's cancel flag is set (``LeaseLost`` when the attempt lost the job,
    ``TimeLimitExceeded`` past the deadline)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: str,
        *,
        attempt: int | None = None,
        lease: Lease | None = None,
        deadline: float | None = None,
        on_block: Callable[[], None] | None = None,
        log_interval_s: float = 10.0,
    ) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt
        self.lease = lease
        self.deadline = deadline  # time.monotonic() value
        self.on_block = on_block  # after each block's progress is written
        # Told of every report that passed the checks (tracking, stage spans); their
        # failures are theirs, never the job's.
        self.listeners: list[Callable[[Progress], None]] = []
        # Where the engine may keep state for a retry (block scores); synced to the store.
        self.resume_dir: Path | None = None
        self.stage: str | None = None
        self.last_done = -1
        self.last_write = 0.0
        self.warnings: list[warnings.WarningMessage] = []
        self._seen_warnings: set[str] = set()
        # The worker's log says what the job is doing too (stage, step/total, loss, ETA).
        self.lines = ProgressLines(log_interval_s)

    def check(self, where: str) -> None:
        """Stop the engine if the attempt lost its lease or ran out of time."""
        if self.lease is not None and not self.lease.held():
            raise LeaseLost(
                f"job {self.job_id} attempt {self.attempt} lost its lease during {where}"
            )
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeLimitExceeded(f"job {self.job_id} ran past its time limit during {where}")

    def __call__(self, progress: Progress) -> None:
        block_done = progress.unit == "blocks" and progress.done != self.last_done
        if block_done and self.on_block is not None:
            # First: the engine saved the block's state before reporting it, and that must
            # reach the store even if this report stops the run (cancel, lease lost).
            self.on_block()
        self.check(progress.stage)
        for listener in self.listeners:
            try:
                listener(progress)
            except Exception:
                log.exception("job %s: a progress listener failed", self.job_id)
        if line := self.lines(progress):
            log.info("%s", line)
        events: list[tuple[str, str, dict[str, Any] | None]] = []
        stage_changed = progress.stage != self.stage
        if stage_changed:
            worker_metrics.stage_started(progress.stage)
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
                attempt=self.attempt,
            )
        if stop:
            if self.attempt is not None:
                with self.sessions() as session:
                    job = crud.get_job(session, self.job_id)
                if job is None or job.status != "running" or job.attempts != self.attempt:
                    raise LeaseLost(f"job {self.job_id} is no longer attempt {self.attempt}'s")
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
    from shortened.engine.prune import prune_model  # torch: imported in the child only
    from shortened.specs import PruneSpec

    return prune_model(
        PruneSpec.model_validate(spec),
        output_dir,
        progress=reporter,
        store=store,
        cache_dir=settings.resolved_model_cache_dir,
        resume_dir=reporter.resume_dir,
        score_cache=_score_cache(store, settings),
    )


def _run_search(
    spec: dict[str, Any],
    output_dir: Path,
    reporter: JobReporter,
    store: ArtifactStore,
    settings: Settings,
) -> dict[str, Any]:
    from shortened.engine.search import search_model  # torch: imported in the child only
    from shortened.specs import SearchSpec

    return search_model(
        SearchSpec.model_validate(spec),
        output_dir,
        progress=reporter,
        store=store,
        cache_dir=settings.resolved_model_cache_dir,
        score_cache=_score_cache(store, settings),
    )


def _score_cache(store: ArtifactStore, settings: Settings) -> Any:
    """Block scores shared by every worker through the artifact store (None: turned off)."""
    from shortened.engine.score_cache import StoreScoreCache

    if not settings.score_cache:
        return None
    return StoreScoreCache(store, lock=score_lock_factory(settings))


def score_lock_factory(settings: Settings) -> Callable[[str, Callable[[], None]], Any]:
    """A lock per score-cache key that spans workers: a PostgreSQL session advisory lock
    (released by the server if the worker dies), or a file lock next to the embedded
    SQLite database (one machine)."""
    from shortened.engine.score_cache import file_lock

    url = settings.resolved_database_url
    if not url.startswith("postgresql"):
        return lambda key, on_wait: file_lock(settings.data_dir / "locks" / f"{key}.lock", on_wait)
    engine = session_factory(settings).kw["bind"]
    # on_wait reports progress, and raises Cancelled when the job is cancelled meanwhile.
    return lambda key, on_wait: session_lock(engine, f"score-cache:{key}", on_wait)


def _checkpoint_dir(settings: Settings, job_id: str) -> Path:
    """Per-job Trainer checkpoints, outside the attempt's work dir so that a retried attempt
    on the same machine resumes from them."""
    return settings.data_dir.resolve() / "checkpoints" / job_id


def _run_retrain(
    spec: dict[str, Any],
    output_dir: Path,
    reporter: JobReporter,
    store: ArtifactStore,
    settings: Settings,
) -> dict[str, Any]:
    from shortened.specs import RetrainSpec

    parsed = RetrainSpec.model_validate(spec)
    from shortened.engine.retrain import retrain_model  # torch: imported in the child only

    checkpoint_dir = _checkpoint_dir(settings, reporter.job_id)
    report = retrain_model(
        parsed,
        output_dir,
        progress=reporter,
        store=store,
        cache_dir=settings.resolved_model_cache_dir,
        checkpoint_dir=checkpoint_dir,
        resume=True,
    )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the model is saved: no resuming now
    return report


def _run_eval(
    spec: dict[str, Any],
    output_dir: Path,
    reporter: JobReporter,
    store: ArtifactStore,
    settings: Settings,
) -> dict[str, Any]:
    from shortened.specs import EvalSpec

    parsed = EvalSpec.model_validate(spec)
    from shortened.engine.baseline_cache import StoreBaselineCache
    from shortened.engine.evaluate import evaluate_model  # torch: imported in the child only

    # The report is also written to output_dir/report.json: the job's artifact.
    return evaluate_model(
        parsed,
        output_dir,
        progress=reporter,
        store=store,
        cache_dir=settings.resolved_model_cache_dir,
        baseline_cache=StoreBaselineCache(store) if settings.baseline_cache else None,
    )


ENGINE_CALLS: dict[
    str, Callable[[dict[str, Any], Path, JobReporter, Any, Settings], dict[str, Any]]
] = {
    "prune": _run_prune,
    "retrain": _run_retrain,
    "eval": _run_eval,
    "search": _run_search,
}


def queue_followups(
    sessions: sessionmaker[Session],
    job_id: str,
    settings: Settings,
    celery: Celery | None = None,
) -> list[str]:
    """Admit a pipeline's next job(s) now that ``job_id`` has succeeded (through
    ``service.submission``, like every job). Each is created at most once (an idempotency
    key per step: a redelivered message creates nothing new); one that cannot be created is
    recorded as a warning, never failing the finished job. A broker outage leaves it queued
    for the reaper to send, as everywhere. Returns the ids created now."""
    from service.pipeline import followup_specs

    created: list[str] = []
    try:
        with sessions() as session:
            job = crud.get_job(session, job_id)
            if job is None:
                return created
            tenant = job.tenant
            steps = followup_specs(session, job)
        for kind, spec in steps:
            with sessions() as session:
                submitted = submit_job(
                    session,
                    settings,
                    celery or app,
                    tenant=tenant,
                    kind=kind,
                    spec=spec,
                    idempotency_key=f"pipeline:{job_id}:{kind}",
                    # It continues admitted work, in the place of the step that just ended.
                    check_limit=False,
                    parent_id=job_id,
                )
                if submitted.replayed:
                    continue  # already created (a redelivered message)
                child = submitted.job
                crud.append_event(
                    session,
                    job_id,
                    "log",
                    f"pipeline: queued {kind} job {child.id}",
                    {"child_id": child.id, "kind": kind},
                )
                session.commit()
                created.append(child.id)
    except Exception as exc:
        log.exception("job %s: could not create its pipeline's next step", job_id)
        with contextlib.suppress(Exception), sessions() as session:
            crud.append_event(
                session, job_id, "warning", f"pipeline: next step not created: {exc}", None
            )
            session.commit()
    return created


_WORK_DIR = re.compile(r"^job-[0-9a-zA-Z]+-p(\d+)-")


def sweep_stale_work_dirs(work_root: Path) -> int:
    """Remove the work directories of dead processes (a worker SIGKILLed mid-job never ran
    its cleanup); live ones, this process's included, are left alone."""
    removed = 0
    for entry in work_root.iterdir() if work_root.is_dir() else ():
        match = _WORK_DIR.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


class ScratchSync:
    """Keeps the attempt's resume directory (block scores) in the artifact store, so the
    next attempt resumes from it even on another machine."""

    def __init__(self, store: ArtifactStore, job_id: str, local_dir: Path) -> None:
        self.store = store
        self.prefix = scratch_prefix(job_id)
        self.local_dir = local_dir
        self._pushed: dict[str, tuple[int, int]] = {}  # name -> (mtime_ns, size) in the store

    def pull(self) -> int:
        from shortened.storage import ArtifactNotFound

        self.local_dir.mkdir(parents=True, exist_ok=True)
        try:
            objects = self.store.list(self.prefix)
        except Exception as exc:
            log.warning("could not list %s: %s", self.prefix, exc)
            return 0
        count = 0
        for obj in objects:
            name = obj.key[len(self.prefix) + 1 :]
            if "/" in name:
                continue
            with contextlib.suppress(ArtifactNotFound):
                self.store.get_file(obj.key, self.local_dir / name)
                stat = (self.local_dir / name).stat()
                self._pushed[name] = (stat.st_mtime_ns, stat.st_size)
                count += 1
        return count

    def push(self) -> None:
        for path in sorted(self.local_dir.glob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            stat = path.stat()
            version = (stat.st_mtime_ns, stat.st_size)
            if self._pushed.get(path.name) == version:
                continue
            try:
                self.store.put_file(f"{self.prefix}/{path.name}", path)
                self._pushed[path.name] = version
            except Exception as exc:  # resuming is an optimisation: never fail the job for it
                log.warning("could not save %s to the store: %s", path.name, exc)

    def drop(self) -> None:
        try:
            self.store.delete_prefix(self.prefix)
        except Exception as exc:
            log.warning("could not remove %s: %s", self.prefix, exc)


def verify_published(store: ArtifactStore, prefix: str, manifest: dict[str, Any]) -> None:
    """Every file of the manifest is in the store with its size, and so is the manifest."""
    from shortened.storage import MANIFEST_NAME, read_manifest

    present = {obj.key: obj.size for obj in store.list(prefix)}
    for entry in manifest["files"]:
        key = f"{prefix}/{entry['name']}"
        if present.get(key) != entry["size"]:
            raise PublishError(
                f"{entry['name']}: expected {entry['size']} bytes in the store, "
                f"found {present.get(key, 'nothing')}"
            )
    stored = read_manifest(store, prefix)
    if stored is None or stored.get("files") != manifest["files"]:
        raise PublishError(f"{MANIFEST_NAME} in the store does not match what was uploaded")


def worker_id() -> str:
    return worker_id_for(os.getpid())


def execute_job(job_id: str, settings: Settings | None = None) -> str | None:
    """``_execute_job`` with the job id on every log line and the worker's job metrics
    (duration by outcome, stage durations; see worker.metrics)."""
    with job_context(job_id), worker_metrics.job_run() as run:
        run.outcome = _execute_job(job_id, settings)
        return run.outcome


def _execute_job(job_id: str, settings: Settings | None = None) -> str | None:
    """Run one queued job to a final status; return that status, None if the job was not
    queued (unknown, cancelled before it started, or already taken by a worker), or
    ``"lost"`` if this attempt lost the job to another one part-way."""
    from shortened.storage import publish_directory, store_from_settings

    settings = settings or get_settings()
    sessions = session_factory(settings)
    worker_name = worker_id()
    with sessions() as session:
        job = crud.claim_job(
            session,
            job_id,
            worker_name,
            lease_ttl_s=settings.lease_ttl_s,
            time_limit_s=settings.job_time_limit_s,
        )
    if job is None:
        log.info("job %s is not queued; nothing to do", job_id)
        return None
    attempt = job.attempts
    worker_metrics.job_claimed(job.kind)
    deadline = time.monotonic() + settings.job_time_limit_s

    work_root = settings.data_dir.resolve() / "tmp"
    work_root.mkdir(parents=True, exist_ok=True)
    if swept := sweep_stale_work_dirs(work_root):
        log.info("removed %d work directories left by dead workers", swept)
    work_dir = Path(tempfile.mkdtemp(prefix=f"job-{job_id}-p{os.getpid()}-", dir=work_root))
    prefix = job_prefix(job_id)
    store: ArtifactStore | None = None
    scratch: ScratchSync | None = None
    published = False
    lost = False

    output_dir = work_dir / "output"

    with Lease(sessions, job_id, attempt, settings) as lease:
        reporter = JobReporter(
            sessions,
            job_id,
            attempt=attempt,
            lease=lease,
            deadline=deadline,
            log_interval_s=settings.progress_log_interval_s,
        )
        annotate_job(job_id, job.kind)  # the Celery task's span
        spans = stage_spans(job_id, job.kind)
        if spans is not None:
            reporter.listeners.append(lambda progress: spans(progress.stage))
        tracking = start_tracking(sessions, job, settings)
        reporter.listeners.append(tracking.on_progress)

        def finish(status: str, message: str, **fields: Any) -> str:
            nonlocal lost
            if spans is not None:
                spans.close(status)
            # Before the final status: a client that sees it finds the run complete too.
            tracking.end(status, fields.get("result"), output_dir)
            if status == "succeeded" and tracking.info is not None:
                fields["result"] = {**fields["result"], "mlflow": tracking.info}
            lease.stop()
            reporter.flush_warnings()
            with sessions() as session:
                done = crud.finish_job(
                    session, job_id, status, message=message, attempt=attempt, **fields
                )
            if not done:  # the job is no longer ours (reaped and re-queued meanwhile)
                lost = True
                return "lost"
            if scratch is not None:
                scratch.drop()
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
                scratch = ScratchSync(store, job_id, work_dir / "resume")
                if attempt > 1 and (restored := scratch.pull()):
                    log.info(
                        "job %s attempt %d: restored %d scratch files", job_id, attempt, restored
                    )
                reporter.resume_dir = scratch.local_dir
                reporter.on_block = scratch.push
                output_dir = work_dir / "output"
                check_fits(job.kind, job.spec, settings)
                report = run(job.spec, output_dir, reporter, store, settings)
                # A cancel that arrives while the checkpoint is being saved is still honoured.
                reporter.stage_change("publishing", f"publishing to {prefix}/")
                published = True
                with storage_errors("publishing the outputs"):
                    manifest = publish_directory(
                        store, output_dir, prefix, extra={"job_id": job_id, "kind": job.kind}
                    )
                    verify_published(store, prefix, manifest)
                reporter.check("publishing")  # lost the lease while uploading: not ours to finish
            artifacts = [
                {"name": f["name"], "size": f["size"], "sha256": f["sha256"]}
                for f in manifest["files"]
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
            # The API's view of the report: no library versions, no server paths (the
            # report.json artifact keeps the full record).
            shown = redact_result(report, spec_strings(job.spec))
            status = finish("succeeded", "succeeded", result=shown, artifacts=artifacts)
            if status == "succeeded":
                queue_followups(sessions, job_id, settings)
            return status
        except LeaseLost:
            # Another attempt owns the job now: record nothing, delete nothing it may use.
            lost = True
            log.warning("job %s attempt %d stopped: lease lost", job_id, attempt)
            return "lost"
        except (TimeLimitExceeded, SoftTimeLimitExceeded):
            message = f"the job ran past its time limit of {settings.job_time_limit_s:g} s"
            return finish("failed", message, error_code="timeout", error_message=message)
        except Cancelled:
            return finish("cancelled", "cancelled")
        except EngineError as exc:
            return finish("failed", str(exc), error_code=exc.code, error_message=str(exc))
        except PublishError as exc:
            message = f"publishing failed: {exc}"
            return finish(
                "failed", message, error_code="artifact_upload_failed", error_message=message
            )
        except Exception as exc:
            # The traceback is for operators: the server log, under the job id. The job's
            # error is the exception's one line, redacted when written (crud).
            log.exception("job %s failed", job_id)
            message = f"{type(exc).__name__}: {exc}"
            return finish("failed", message, error_code="internal_error", error_message=message)
        finally:
            # An earlier attempt killed mid-upload may have left objects there too.
            if (published or attempt > 1) and store is not None and not lost:
                with sessions() as session:
                    current = crud.get_job(session, job_id)
                if current is None or current.status != "succeeded":
                    try:  # the manifest is written last, so without it nothing looks published
                        store.delete_prefix(prefix)
                    except Exception:
                        log.exception("could not clean up %s", prefix)
            shutil.rmtree(work_dir, ignore_errors=True)


# The message of a job that is no longer queued is dropped before it reaches the pool.
@app.task(name=RUN_JOB_TASK, ignore_result=True, Request="worker.dispatch:JobRequest")
def run_job(job_id: str) -> None:
    """Run job ``job_id`` (which must be 'queued'); its outcome is recorded in the job store."""
    execute_job(job_id)
