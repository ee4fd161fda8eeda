"""One attempt at one job (:class:`JobRun`): claim -> run the engine -> publish -> finish.

The claim is a compare-and-set (queued -> running as attempt n, so a redelivered or
duplicate message is a no-op). While the engine runs, the attempt's lease is renewed from a
heartbeat thread and progress goes to the job store through the reporter; every write is
fenced by the attempt number, so an attempt that lost its lease stops at its next report and
never publishes or finishes the job. The output is published with a manifest and checked
before the final status is recorded; a failure removes whatever was uploaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded

from service.stores import events as event_store
from service.stores import job_lifecycle, job_reads, job_recovery
from service.tracing import annotate_job, stage_spans
from shortened.config import Settings
from shortened.engine.errors import Cancelled, EngineError
from shortened.kinds import JOB_KINDS
from shortened.redact import redact_result, spec_strings
from shortened.storage.keys import job_prefix
from worker import metrics as worker_metrics
from worker.capacity import check_fits
from worker.cluster import runs_on_cluster
from worker.engine_call import EngineContext, call_engine
from worker.followups import queue_followups
from worker.lease import Lease, LeaseLost, TimeLimitExceeded
from worker.processes import worker_id_for
from worker.publish import PublishError, publish
from worker.reporter import JobReporter
from worker.scratch import ScratchSync, make_work_dir
from worker.sessions import session_factory
from worker.tracking import start_tracking

if TYPE_CHECKING:
    from service.models import Job
    from shortened.storage import ArtifactStore

log = logging.getLogger(__name__)


class JobRun:
    """One attempt at job ``job_id``; :meth:`execute` runs it to a final status."""

    def __init__(self, job_id: str, settings: Settings, worker: str) -> None:
        self.job_id = job_id
        self.settings = settings
        self.worker = worker
        self.sessions = session_factory(settings)
        self.prefix = job_prefix(job_id)
        self.job: Job | None = None
        self.attempt = 0
        self.work_dir: Path | None = None
        self.output_dir = Path()
        self.store: ArtifactStore | None = None
        self.scratch: ScratchSync | None = None
        self.published = False  # an upload began: a failure must remove it
        self.lost = False  # another attempt owns the job: touch nothing of it

    # ----------------------------------------------------------------- the steps

    def claim(self) -> bool:
        """Take the job if it is queued (as the next attempt)."""
        with self.sessions() as session:
            self.job = job_lifecycle.claim_job(
                session,
                self.job_id,
                self.worker,
                lease_ttl_s=self.settings.lease_ttl_s,
                time_limit_s=self.settings.job_time_limit_s,
            )
        if self.job is None:
            return False
        self.attempt = self.job.attempts
        worker_metrics.job_claimed(self.job.kind)
        return True

    def execute(self) -> str | None:
        """The job's final status; None if it was not queued (unknown, cancelled before it
        started, or taken by another worker), ``"lost"`` if another attempt took it over."""
        if not self.claim():
            log.info("job %s is not queued; nothing to do", self.job_id)
            return None
        assert self.job is not None
        deadline = time.monotonic() + self.settings.job_time_limit_s
        self.work_dir = make_work_dir(self.settings, self.job_id)
        self.output_dir = self.work_dir / "output"
        try:
            with Lease(self.sessions, self.job_id, self.attempt, self.settings) as self.lease:
                self.reporter = JobReporter(
                    self.sessions,
                    self.job_id,
                    attempt=self.attempt,
                    lease=self.lease,
                    deadline=deadline,
                    log_interval_s=self.settings.progress_log_interval_s,
                )
                self._observe(self.job)
                try:
                    return self._run(self.job)
                except Exception as exc:  # noqa: BLE001 - every outcome is recorded
                    return self._failed(exc)
                finally:
                    self._remove_unfinished_upload()
        finally:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _observe(self, job: Job) -> None:
        """Trace spans per stage and the tracking run listen to the job's progress."""
        annotate_job(self.job_id, job.kind)  # the Celery task's span
        self.spans = stage_spans(self.job_id, job.kind)
        if self.spans is not None:
            spans = self.spans
            self.reporter.listeners.append(lambda progress: spans(progress.stage))
        self.tracking = start_tracking(self.sessions, job, self.settings)
        self.reporter.listeners.append(self.tracking.on_progress)

    def _run(self, job: Job) -> str:
        output_dir = self.output_dir
        kind = JOB_KINDS.get(job.kind)
        if kind is None:
            message = f"unsupported job kind {job.kind!r}"
            return self.finish(
                "failed", message, error_code="unsupported_kind", error_message=message
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            self.reporter.warnings = caught
            self.store = self._open_store()
            if not runs_on_cluster(job.spec):  # there, the training runs on other machines
                check_fits(job.kind, job.spec, self.settings)
            context = EngineContext(
                self.job_id, job.tenant, output_dir, self.reporter, self.store, self.settings
            )
            report = call_engine(kind, job.spec, context)
            artifacts = self.publish(output_dir, job.kind)
        self._log(f"published {len(artifacts)} files to {self.prefix}/", {"files": len(artifacts)})
        # The API's view of the report: no library versions, no server paths (the
        # report.json artifact keeps the full record).
        shown = redact_result(report, spec_strings(job.spec))
        status = self.finish("succeeded", "succeeded", result=shown, artifacts=artifacts)
        if status == "succeeded":
            queue_followups(self.sessions, self.job_id, self.settings)
        return status

    def _open_store(self) -> ArtifactStore:
        """The artifact store, and the resume directory restored from it on a retry."""
        from shortened.storage import store_from_settings

        assert self.work_dir is not None
        store = store_from_settings(self.settings)
        self.scratch = ScratchSync(store, self.job_id, self.work_dir / "resume")
        if self.attempt > 1 and (restored := self.scratch.pull()):
            log.info(
                "job %s attempt %d: restored %d scratch files", self.job_id, self.attempt, restored
            )
        self.reporter.resume_dir = self.scratch.local_dir
        self.reporter.on_block = self.scratch.push
        return store

    def publish(self, output_dir: Path, kind: str) -> list[dict[str, Any]]:
        """Upload the output with its manifest and check it; a cancel or a lost lease that
        arrives meanwhile is still honoured (nothing is finished by an attempt that lost)."""
        assert self.store is not None
        self.reporter.stage_change("publishing", f"publishing to {self.prefix}/")
        self.published = True
        artifacts = publish(self.store, output_dir, self.prefix, self.job_id, kind)
        self.reporter.check("publishing")
        return artifacts

    def finish(self, status: str, message: str, **fields: Any) -> str:
        """Record the final status (fenced by the attempt); ``"lost"`` when the job is no
        longer this attempt's."""
        # Before the final status: a client that sees it finds the run complete too.
        self._close_attempt(status, status, fields.get("result"))
        if status == "succeeded" and self.tracking.info is not None:
            fields["result"] = {**fields["result"], "mlflow": self.tracking.info}
        with self.sessions() as session:
            done = job_lifecycle.finish_job(
                session, self.job_id, status, message=message, attempt=self.attempt, **fields
            )
        if not done:  # the job is no longer ours (reaped and re-queued meanwhile)
            self.lost = True
            return "lost"
        if self.scratch is not None:
            self.scratch.drop()
        return status

    def _close_attempt(self, span_status: str, run_status: str, result: Any) -> None:
        """What ends with this attempt whatever comes next: its trace spans, its tracking run,
        its lease, and the warnings it collected (recorded as events)."""
        if self.spans is not None:
            self.spans.close(span_status)
        self.tracking.end(run_status, result, self.output_dir)
        self.lease.stop()
        self.reporter.flush_warnings()

    # ----------------------------------------------------------------- outcomes

    def _failed(self, exc: Exception) -> str:
        """The final status for what stopped the run."""
        if isinstance(exc, LeaseLost):
            # Another attempt owns the job now: record nothing, delete nothing it may use.
            self.lost = True
            log.warning("job %s attempt %d stopped: lease lost", self.job_id, self.attempt)
            return "lost"
        if isinstance(exc, TimeLimitExceeded | SoftTimeLimitExceeded):
            message = f"the job ran past its time limit of {self.settings.job_time_limit_s:g} s"
            return self.finish("failed", message, error_code="timeout", error_message=message)
        if isinstance(exc, Cancelled):
            return self.finish("cancelled", "cancelled")
        if isinstance(exc, EngineError) and exc.retryable:
            return self._retry(exc)
        if isinstance(exc, EngineError):
            return self.finish("failed", str(exc), error_code=exc.code, error_message=str(exc))
        if isinstance(exc, PublishError):
            message = f"publishing failed: {exc}"
            return self.finish(
                "failed", message, error_code="artifact_upload_failed", error_message=message
            )
        # The traceback is for operators: the server log, under the job id. The job's
        # error is the exception's one line, redacted when written (the job store).
        log.error("job %s failed", self.job_id, exc_info=exc)
        message = f"{type(exc).__name__}: {exc}"
        return self.finish("failed", message, error_code="internal_error", error_message=message)

    def _retry(self, exc: EngineError) -> str:
        """A retryable failure: the job goes back to the queue for another attempt, which
        resumes from this one's checkpoints (kept in the scratch store), unless this attempt
        was the last one allowed."""
        last = self.attempt >= self.settings.max_attempts
        if last:
            message = f"{exc} (attempt {self.attempt} of {self.settings.max_attempts})"
            return self.finish("failed", message, error_code=exc.code, error_message=message)
        self._close_attempt("queued", "failed", None)
        log.warning("job %s attempt %d failed (%s): re-queued", self.job_id, self.attempt, exc.code)
        with self.sessions() as session:
            if not job_recovery.requeue_for_retry(session, self.job_id, self.attempt, exc.code):
                self.lost = True
                return "lost"
        return "queued"

    def _remove_unfinished_upload(self) -> None:
        """An upload of a job that did not succeed is removed (an earlier attempt killed
        mid-upload may have left objects too); the manifest is written last, so without it
        nothing looks published meanwhile."""
        if not (self.published or self.attempt > 1) or self.store is None or self.lost:
            return
        with self.sessions() as session:
            current = job_reads.get_job(session, self.job_id)
        if current is None or current.status != "succeeded":
            try:
                self.store.delete_prefix(self.prefix)
            except Exception:
                log.exception("could not clean up %s", self.prefix)

    def _log(self, message: str, data: dict[str, Any]) -> None:
        with self.sessions() as session:
            event_store.append_event(session, self.job_id, "log", message, data)
            session.commit()


def worker_id() -> str:
    return worker_id_for(os.getpid())
