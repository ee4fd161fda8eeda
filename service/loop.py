"""``BackgroundLoop``: a round of work repeated every interval until stopped, on a daemon
thread in the API (``start`` / ``stop``) or in the foreground of its own process
(``run_forever``). The reaper, the scheduler and the webhook dispatcher are loops."""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class BackgroundLoop:
    #: thread name and log label
    loop_name = "loop"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> Any:
        raise NotImplementedError

    def after_round(self, report: Any) -> bool:
        """Called after each successful round; True runs the next round at once."""
        return False

    def wait_s(self, interval_s: float) -> float:
        """How long to wait before the next round."""
        return interval_s

    def run_forever(self, interval_s: float) -> None:
        while not self._stop.is_set():
            again = False
            try:
                again = self.after_round(self.run_once())
            except Exception:  # e.g. the database is down: try again next round
                log.exception("%s round failed", self.loop_name)
            if not again:
                self._stop.wait(self.wait_s(interval_s))

    def start(self, interval_s: float) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run_forever, args=(interval_s,), name=self.loop_name, daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end (safe from a signal handler) and wait for its thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
