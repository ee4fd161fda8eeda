"""The engine's progress callback for one job (:class:`JobReporter`).

It writes the job's stage and progress columns, stage and metric events and captured Python
warnings to the job store, logs a progress line, tells its listeners (tracking, trace
spans), and stops the engine when the job is cancelled, the attempt lost its lease or the job
ran out of time.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.stores import events as event_store
from service.stores import job_lifecycle, job_reads
from shortened.engine.errors import Cancelled
from shortened.engine.progress import Progress, ProgressLines
from worker import metrics as worker_metrics
from worker.lease import Lease, LeaseLost, TimeLimitExceeded

log = logging.getLogger(__name__)

# Progress is written (and the cancel flag read) at every stage change and every block,
# otherwise at most this often: one cheap UPDATE ... RETURNING per write.
PROGRESS_WRITE_INTERVAL_S = 1.0


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
            stop = job_lifecycle.record_progress(
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
                    job = job_reads.get_job(session, self.job_id)
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
                    event_store.append_event(session, self.job_id, type_, message, data)
                session.commit()
