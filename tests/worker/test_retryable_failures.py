"""A retryable engine failure (a process of a multi-process training run died) does not fail
the job: the attempt ends, the job goes back to the queue for the reaper's next re-dispatch,
and the next attempt runs (resuming from the checkpoints the scratch store kept). On the last
attempt allowed it fails with the engine's code. A failure that is not retryable fails at once.
Run by the real worker code on both job stores."""

from __future__ import annotations

import pytest

import worker.run
from service.stores.events import list_events
from service.stores.job_recovery import due_for_redispatch
from shortened.engine.errors import DataError, TrainingProcessFailed
from tests.service.test_submission import Api, api_for  # noqa: F401 - the fixture
from worker.tasks import execute_job


def _job(api: Api, job_id: str) -> dict:
    return api.client.get(f"/jobs/{job_id}", headers=api.headers).json()


def _failing_engine(monkeypatch: pytest.MonkeyPatch, failures: list[Exception]) -> list[int]:
    """The engine raises ``failures`` in turn, then runs for real; the attempts it saw."""
    real, seen = worker.run.call_engine, []

    def engine(kind, spec, context):  # type: ignore[no-untyped-def]
        seen.append(len(seen) + 1)
        if failures:
            raise failures.pop(0)
        return real(kind, spec, context)

    monkeypatch.setattr(worker.run, "call_engine", engine)
    return seen


def test_a_dead_training_process_requeues_the_job_and_the_next_attempt_runs(
    api_for,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = api_for(None, max_attempts=3)
    seen = _failing_engine(monkeypatch, [TrainingProcessFailed("rank 1 exited with -9")])
    job_id = api.submit(criterion="magnitude", calibration=None)
    assert execute_job(job_id, api.settings) == "queued"
    job = _job(api, job_id)
    assert job["status"] == "queued" and job["error"] is None
    with api.sessions() as session:
        # The reaper's next round sends it again, first in line.
        assert job_id in due_for_redispatch(session, after_s=3600)
        messages = [e.message for e in list_events(session, job_id)]
    assert any("re-queued: attempt 1 failed (training_process_failed)" in m for m in messages)
    assert execute_job(job_id, api.settings) == "succeeded"
    assert seen == [1, 2] and _job(api, job_id)["attempts"] == 2


def test_the_last_attempt_fails_with_the_engine_code_and_other_errors_fail_at_once(
    api_for,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = api_for(None, max_attempts=2)
    dead = [TrainingProcessFailed("rank 0 exited with -9") for _ in range(2)]
    _failing_engine(monkeypatch, [*dead, DataError("the data file is empty")])
    job_id = api.submit(criterion="magnitude", calibration=None)
    assert execute_job(job_id, api.settings) == "queued"
    assert execute_job(job_id, api.settings) == "failed"
    job = _job(api, job_id)
    assert job["error"]["code"] == "training_process_failed"
    assert "attempt 2 of 2" in job["error"]["message"]

    other = api.submit(criterion="magnitude", calibration=None)
    assert execute_job(other, api.settings) == "failed"
    assert _job(api, other)["error"]["code"] == DataError.code
