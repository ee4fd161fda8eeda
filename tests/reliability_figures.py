"""Figures measured by the reliability tests, written to ``test-artifacts/reliability.json``.

Each test adds what it measured (jobs submitted and their fate, faults injected by kind,
fuzz cases, cross-tenant attempts refused); the file is rewritten after every addition, so
it reflects whatever subset of the tests ran in this pytest process.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "test-artifacts" / "reliability.json"

_counts: Counter[str] = Counter()
_faults: Counter[str] = Counter()
_started = time.monotonic()


def _write() -> None:
    data: dict[str, Any] = {
        "jobs_submitted": _counts["jobs_submitted"],
        "jobs_reached_final_state": _counts["jobs_final"],
        "jobs_lost": _counts["jobs_submitted"] - _counts["jobs_final"],
        "jobs_run_twice": _counts["jobs_run_twice"],
        "duplicate_deliveries_ignored": _counts["duplicates_ignored"],
        "attempts_resumed_from_saved_scores": _counts["resumed_attempts"],
        "faults_injected": dict(sorted(_faults.items())),
        "faults_injected_total": sum(_faults.values()),
        "fuzz_cases": _counts["fuzz_cases"],
        "cross_tenant_attempts": _counts["cross_tenant_attempts"],
        "cross_tenant_attempts_refused": _counts["cross_tenant_refused"],
        "hostile_inputs_refused": _counts["hostile_refused"],
        "hostile_inputs": _counts["hostile_inputs"],
        "generated_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - _started, 1),
    }
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUTPUT.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, OUTPUT)


def count(**amounts: int) -> None:
    _counts.update(amounts)
    _write()


def fault(kind: str, amount: int = 1) -> None:
    _faults[kind] += amount
    _write()


def _as_datetime(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def attempts_overlap(attempts: list[dict[str, Any]]) -> bool:
    """Whether two attempts of one job ran at the same time (``attempt_history`` items):
    an attempt that has not ended overlaps any later one."""
    spans = sorted(
        (_as_datetime(a["started_at"]), _as_datetime(a["ended_at"]) if a["ended_at"] else None)
        for a in attempts
    )
    for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False):
        if end is None or next_start < end:
            return True
    return False


def record_jobs(jobs: list[dict[str, Any]]) -> None:
    """Count jobs (as returned by GET /jobs/{id}) and how they ended: a job is final when
    its status is, and run twice when it has overlapping attempts or more than one attempt
    that ran to an end of its own (anything but worker_lost)."""
    final = sum(job["status"] in ("succeeded", "failed", "cancelled") for job in jobs)
    twice = 0
    for job in jobs:
        history = job.get("attempt_history") or []
        completed = [a for a in history if a["outcome"] not in ("worker_lost", "running")]
        if attempts_overlap(history) or len(completed) > 1:
            twice += 1
    count(jobs_submitted=len(jobs), jobs_final=final, jobs_run_twice=twice)
