"""One attempt of a multi-node retrain job on Kubeflow Trainer: submit, follow, collect.

:func:`run_on_kubeflow` renders the attempt's TrainJob (``manifest``), removes what earlier
attempts of the job left on the cluster, creates it, and follows it until the operator says it
completed or failed: the status through a watch, rank 0's progress and output through its
pod's log (``logs``). Every round it also reports to the job (the reporter), which is where a
cancel, a lost lease or the time limit stops the run; whatever stops it, the TrainJob is
deleted (its pods with it) and the attempt's staging output removed. A training that
completed is collected from the staging prefix (``staging``) into the output directory, which
the worker then publishes as for any job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from service.stores import events as event_store
from shortened.engine.progress import Progress
from shortened.storage.keys import staging_prefix
from worker.cluster.errors import ClusterTrainingFailed
from worker.cluster.logs import LogMirror, RankZeroLog
from worker.cluster.manifest import (
    LABEL_JOB_ID,
    TrainJobRequest,
    cluster_target,
    render_train_job,
)
from worker.cluster.staging import collect_staged_output
from worker.cluster.status import TrainJobState, train_job_state

if TYPE_CHECKING:
    from shortened.specs import RetrainSpec
    from worker.cluster.context import RunContext
    from worker.cluster.kube import TrainJobs

log = logging.getLogger(__name__)

# Rounds in a row the Kubernetes API may fail (a restarting API server) before the job does.
MAX_API_FAILURES = 12


def _api_errors() -> tuple[type[BaseException], ...]:
    """What a call to an unreachable or failing API server raises."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    return ApiException, HTTPError, OSError


class TrainJobFollower:
    """Follows one TrainJob to its end, mirroring it into the job."""

    def __init__(
        self,
        jobs: TrainJobs,
        name: str,
        ctx: RunContext,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.jobs = jobs
        self.name = name
        self.ctx = ctx
        self.interval_s = ctx.settings.kubeflow_poll_interval_s
        self.sleep = sleep
        self.log = RankZeroLog(jobs, name)
        self.mirror = LogMirror(ctx.reporter, ctx.job_id)
        self.state = TrainJobState("pending")
        self.failures = 0

    def until_finished(self, created: dict[str, Any]) -> TrainJobState:
        version = str(created.get("metadata", {}).get("resourceVersion", ""))
        self._observe(created)
        while True:
            started = time.monotonic()
            version = self._watch(version)
            self._pump_log()
            if self.state.finished:
                return self.state
            # Also the cancel check: the reporter raises when the job was cancelled, the
            # attempt lost its lease or ran out of time.
            self.ctx.reporter(self.mirror.last or self._waiting())
            self.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    def _waiting(self) -> Progress:
        if self.state.phase == "pending":
            return Progress("scheduling", message=f"TrainJob {self.name}: waiting for its nodes")
        return Progress("scheduling", message=f"TrainJob {self.name}: nodes starting")

    def _watch(self, version: str) -> str:
        """Read the object's changes for up to one interval; the newest resource version."""
        from kubernetes.client.exceptions import ApiException

        try:
            for kind, obj in self.jobs.watch(self.name, version, self.interval_s):
                if kind == "DELETED":
                    raise ClusterTrainingFailed(
                        f"TrainJob {self.name} was deleted before the training ended"
                    )
                version = str(obj.get("metadata", {}).get("resourceVersion", version))
                self._observe(obj)
                if self.state.finished:
                    break
            self.failures = 0
        except ApiException as exc:
            if exc.status != 410:  # 410: the version is too old to watch from: read anew
                self._api_failed(exc)
                return version
            return self._resync(version)
        except _api_errors() as exc:
            self._api_failed(exc)
        return version

    def _resync(self, version: str) -> str:
        try:
            obj = self.jobs.get(self.name)
        except _api_errors() as exc:
            self._api_failed(exc)
            return version
        if obj is None:
            raise ClusterTrainingFailed(
                f"TrainJob {self.name} was deleted before the training ended"
            )
        self._observe(obj)
        return str(obj.get("metadata", {}).get("resourceVersion", ""))

    def _pump_log(self) -> None:
        try:
            lines = self.log.new_lines()
        except _api_errors() as exc:  # the status decides the outcome, not the log
            log.warning("TrainJob %s: could not read rank 0's log: %s", self.name, exc)
            return
        self.mirror.feed(lines)

    def _api_failed(self, exc: BaseException) -> None:
        self.failures += 1
        log.warning("TrainJob %s: Kubernetes API call failed: %s", self.name, exc)
        if self.failures >= MAX_API_FAILURES:
            raise ClusterTrainingFailed(
                f"lost contact with the Kubernetes API while following TrainJob {self.name}: {exc}"
            ) from exc

    def _observe(self, obj: dict[str, Any]) -> None:
        state = train_job_state(obj)
        if state.phase != self.state.phase:
            _event(self.ctx, f"TrainJob {self.name}: {state.describe()}", {"phase": state.phase})
        self.state = state


def _event(ctx: RunContext, message: str, data: dict[str, Any] | None = None) -> None:
    log.info("%s", message)
    with ctx.reporter.sessions() as session:
        event_store.append_event(session, ctx.job_id, "log", message, data)
        session.commit()


def _remove_earlier_attempts(jobs: TrainJobs, ctx: RunContext, attempt: int) -> None:
    """TrainJobs and staging output of this job's earlier attempts (a worker that died
    could not delete its own): they would hold nodes and storage the job no longer uses."""
    for name in jobs.names(f"{LABEL_JOB_ID}={ctx.job_id}"):
        if jobs.delete(name):
            _event(ctx, f"deleted TrainJob {name} of an earlier attempt")
    for earlier in range(1, attempt):
        ctx.store.delete_prefix(staging_prefix(ctx.job_id, earlier))


def _deadline_s(ctx: RunContext) -> int | None:
    deadline = ctx.reporter.deadline
    return None if deadline is None else int(deadline - time.monotonic())


def run_on_kubeflow(
    spec: RetrainSpec,
    ctx: RunContext,
    *,
    jobs: TrainJobs | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Run the job's training as a TrainJob and return rank 0's report; the output is in
    ``ctx.output_dir`` for the worker to publish."""
    from kubernetes.client.exceptions import ApiException

    from worker.cluster.kube import TrainJobs, api_client

    target = cluster_target(ctx.settings)
    attempt = ctx.reporter.attempt or 1
    staging = staging_prefix(ctx.job_id, attempt)
    nproc = spec.distributed.nproc_per_node
    assert isinstance(nproc, int), "admission refuses 'auto' with nnodes > 1"
    request = TrainJobRequest(
        job_id=ctx.job_id,
        tenant=ctx.tenant,
        attempt=attempt,
        # The ranks train; notifying and tracking stay with the worker, and their targets
        # (webhook URLs) are not for everyone who may read TrainJobs in the namespace.
        spec=spec.model_dump(mode="json", exclude={"webhook", "tracking"}),
        nnodes=spec.distributed.nnodes,
        nproc_per_node=nproc,
        staging_prefix=staging,
        deadline_s=_deadline_s(ctx),
    )
    body = render_train_job(target, request)
    name = body["metadata"]["name"]
    if jobs is None:
        jobs = TrainJobs(api_client(ctx.settings), target.namespace)
    ctx.reporter.stage_change(
        "submitting",
        f"TrainJob {target.namespace}/{name}: {request.nnodes} nodes x {nproc} processes",
    )
    try:
        _remove_earlier_attempts(jobs, ctx, attempt)
        created = jobs.create(body)
    except ApiException as exc:
        raise ClusterTrainingFailed(
            f"the cluster refused TrainJob {name}: {exc.status} {exc.reason}"
        ) from exc
    _event(ctx, f"created TrainJob {target.namespace}/{name}", {"train_job": name})
    follower = TrainJobFollower(jobs, name, ctx, sleep=sleep)
    try:
        state = follower.until_finished(created)
        if state.phase == "failed":
            raise ClusterTrainingFailed(_failure_message(name, state, list(follower.mirror.tail)))
        ctx.reporter.stage_change("collecting", f"verifying the output under {staging}/")
        return collect_staged_output(ctx.store, staging, ctx.output_dir)
    finally:
        _clean_up(jobs, name, ctx, staging)


def _failure_message(name: str, state: TrainJobState, tail: list[str]) -> str:
    reason = ": ".join(part for part in (state.reason, state.message) if part)
    message = f"the training on the cluster failed (TrainJob {name}: {reason or 'Failed'})"
    return f"{message}; rank 0's last line: {tail[-1]}" if tail else message


def _clean_up(jobs: TrainJobs, name: str, ctx: RunContext, staging: str) -> None:
    """Never masks what ended the run: a failure here is logged for the operator."""
    lease = ctx.reporter.lease
    try:
        # After a lost lease the job is another attempt's: its events are not ours to write.
        if jobs.delete(name) and (lease is None or lease.held()):
            _event(ctx, f"deleted TrainJob {name}")
    except Exception:
        log.exception("could not delete TrainJob %s", name)
    try:
        ctx.store.delete_prefix(staging)
    except Exception:
        log.exception("could not remove %s", staging)
