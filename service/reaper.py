"""The reaper: no accepted job is left behind by a lost worker or a lost message.

Each round it

1. finds running jobs whose lease expired (their worker was SIGKILLed, OOM-killed, lost its
   node or its database connection): re-queues them for another attempt and re-sends their
   message, or fails them with ``worker_lost`` (``timeout`` past their deadline) when that
   was the last attempt (``max_attempts``), or cancels them if a cancel was asked for;
2. re-sends the message of queued jobs nobody claimed within ``redispatch_after_s``
   (doubling each time): the message may have been lost with a broker restart.

Every change is a compare-and-set in the job store and a duplicate message is a no-op for
the worker (it claims only 'queued' jobs), so any number of reapers may run: one thread in
each API replica (``reaper_interval_s``) and/or ``python -m service.reaper``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.loop import BackgroundLoop
from service.stores.job_recovery import due_for_redispatch, reap_expired_leases
from service.submission import dispatch
from shortened.config import Settings
from shortened.storage.keys import job_prefix, scratch_prefix

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    send_errors: int = 0


class Reaper(BackgroundLoop):
    loop_name = "reaper"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> None:
        super().__init__()
        self.settings = settings
        self.sessions = sessions
        self.celery = celery
        self._store: Any = None

    def _send(self, job_id: str, report: ReapReport) -> None:
        # Broker down: the job stays queued and the next round tries again.
        with self.sessions() as session:
            report.send_errors += len(dispatch(session, self.celery, [job_id], first=False))

    def _drop_leftovers(self, job_id: str) -> None:
        """The scratch data and any unpublished upload of a job that ended without
        succeeding: a worker killed mid-upload leaves objects that nothing else removes."""
        try:
            if self._store is None:
                from shortened.storage import store_from_settings

                self._store = store_from_settings(self.settings)
            self._store.delete_prefix(scratch_prefix(job_id))
            self._store.delete_prefix(job_prefix(job_id))
        except Exception as exc:
            log.warning("could not remove the leftovers of job %s: %s", job_id, exc)

    def run_once(self) -> ReapReport:
        report = ReapReport()
        with self.sessions() as session:
            reaped = reap_expired_leases(session, max_attempts=self.settings.max_attempts)
        for job in reaped:
            log.warning("job %s attempt %d: worker lost, %s", job.job_id, job.attempt, job.action)
            if job.action == "requeued":
                report.requeued.append(job.job_id)
                self._send(job.job_id, report)
            else:
                (report.failed if job.action == "failed" else report.cancelled).append(job.job_id)
                self._drop_leftovers(job.job_id)
        with self.sessions() as session:
            due = due_for_redispatch(session, after_s=self.settings.redispatch_after_s)
        for job_id in due:
            log.info("job %s still queued: re-sending its message", job_id)
            report.redispatched.append(job_id)
            self._send(job_id, report)
        return report


if __name__ == "__main__":  # the same as ``shortened reaper``
    from shortened.cli.service_commands import start_service_command

    start_service_command("reaper")
