"""Rank 0's output, read from its pod's log and mirrored into the job.

:class:`RankZeroLog` reads the log of node 0's pod a piece at a time: each read asks for the
last stretch (``sinceSeconds``: the time since the previous read plus a margin, so neither a
slow read nor the clocks of two machines lose a line) and keeps only lines stamped after the
last one seen. :class:`LogMirror` hands the marked progress lines to the job's reporter (stage,
progress, metrics; a cancel or a lost lease stops the run there) and writes the other lines as
``log`` events, up to a limit per attempt, and to the worker's log.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.stores import events as event_store
from shortened.engine.progress import Progress
from shortened.engine.progress_wire import parse_progress_line

if TYPE_CHECKING:
    from worker.cluster.kube import TrainJobs
    from worker.reporter import JobReporter

log = logging.getLogger(__name__)

# Re-read this much before the previous read: lines the kubelet wrote while it was answering.
OVERLAP_S = 30
# Log events one attempt writes; the pod's log (and the worker's) keep the rest.
MAX_LOG_EVENTS = 500
TAIL_LINES = 5  # quoted in the error of a failed training

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z (.*)$")


def _split(line: str) -> tuple[tuple[str, str] | None, str]:
    """(sortable timestamp, text) of a ``timestamps=true`` log line."""
    found = _STAMP.match(line)
    if found is None:
        return None, line
    seconds, fraction, text = found.groups()
    return (seconds, (fraction or "").ljust(9, "0")), text


class RankZeroLog:
    """New lines of node 0's pod log, each call the lines written since the last."""

    def __init__(
        self, jobs: TrainJobs, name: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.jobs = jobs
        self.name = name
        self.clock = clock
        self.pod: str | None = None
        self.last_stamp: tuple[str, str] | None = None
        self.last_read: float | None = None

    def new_lines(self) -> list[str]:
        pod = self.jobs.rank0_pod(self.name)
        if pod is None:
            return []
        if pod != self.pod:  # the first pod, or node 0's Job replaced it: from its start
            self.pod, self.last_stamp, self.last_read = pod, None, None
        since = None
        if self.last_read is not None:
            since = math.ceil(self.clock() - self.last_read) + OVERLAP_S
        read_at = self.clock()
        text = self.jobs.read_log(pod, since)
        self.last_read = read_at
        lines = []
        for raw in text.splitlines():
            stamp, line = _split(raw)
            if stamp is not None:
                if self.last_stamp is not None and stamp <= self.last_stamp:
                    continue  # read before
                self.last_stamp = stamp
            lines.append(line)
        return lines


class LogMirror:
    """Rank 0's lines into the job: progress to the reporter, the rest as log events."""

    def __init__(self, reporter: JobReporter, job_id: str, limit: int = MAX_LOG_EVENTS) -> None:
        self.reporter = reporter
        self.job_id = job_id
        self.limit = limit
        self.written = 0
        self.last: Progress | None = None  # rank 0's latest update
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    def feed(self, lines: list[str]) -> None:
        """Mirror ``lines``; the reporter may raise (cancel, lease lost, time limit)."""
        updates: list[Progress] = []
        events: list[str] = []
        for line in lines:
            if (update := parse_progress_line(line)) is not None:
                updates.append(update)
                continue
            if not line.strip():
                continue
            log.info("rank 0: %s", line)
            self.tail.append(line)
            events.append(line)
        self._write(events)
        for update in updates:
            self.last = update
            self.reporter(update)

    def _write(self, lines: list[str]) -> None:
        room = self.limit - self.written
        if not lines or room < 0:
            return
        shown = lines[:room]
        with self.reporter.sessions() as session:
            for line in shown:
                event_store.append_event(session, self.job_id, "log", line, {"source": "rank 0"})
            if len(lines) > room:
                message = (
                    f"rank 0 printed more than {self.limit} lines: the rest is in its pod's log"
                )
                event_store.append_event(session, self.job_id, "log", message, None)
            session.commit()
        self.written += len(shown) + (1 if len(lines) > room else 0)
