"""The attempt's lease on its job: renewed from a heartbeat thread while the engine runs.

A worker that cannot renew the lease for 90% of its TTL, or is told by the job store that the
attempt no longer holds the job, stops on its own (``LeaseLost``): by then the reaper may have
handed the job to another attempt (fencing). ``TimeLimitExceeded`` is the other way a running
attempt is stopped from the inside.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from service.stores import job_lifecycle
from shortened.config import Settings
from shortened.engine.errors import Cancelled

log = logging.getLogger(__name__)


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
                    still_ours = job_lifecycle.renew_lease(
                        session, self.job_id, self.attempt, self.ttl_s
                    )
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
