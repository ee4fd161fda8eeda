"""A job's MLflow run: parameters at the start, training metrics as they come, the report's
metrics, artifacts and the model registration at the end.

Which server and experiment: the spec's ``tracking.mlflow`` section, else the server's
``SHORTENED_MLFLOW_TRACKING_URI``; neither means no tracking, and then mlflow is never
imported. The tracking server is other teams' infrastructure: nothing it does may fail a
job. The first failure is logged, shown as a ``warning`` event on the job, and ends the
tracking of that job (each further call would only wait for the same timeout again).

Pipeline steps nest under one parent run: the first step creates it and records its id in
an event of the root job, where later steps find it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.pipeline import planned_kinds, root_of
from service.stores import events as event_store
from service.stores import job_reads
from shortened.config import Settings
from shortened.deadline import DeadlineExceeded, call_with_deadline
from shortened.engine.progress import Progress
from shortened.redact import redact_uri
from shortened.storage.keys import job_prefix

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from service.models import Job

log = logging.getLogger(__name__)

# MLflow's limits: a param value holds 6000 characters, one log_batch 100 params / 1000 metrics.
MAX_PARAM_CHARS = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
# Training metrics the engine's progress reports carry (worker's retrain reporter).
TRAINING_METRICS = ("loss", "eval_loss", "learning_rate", "grad_norm")
# Kinds whose output is a model that can be registered.
MODEL_KINDS = ("prune", "retrain")
FINAL_RUN_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
# Error codes of an MlflowException that say the server is unreachable or failing (a
# connection error is INTERNAL_ERROR too), rather than that it refused one request.
SERVER_TROUBLE = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
_NOT_IN_METRIC_NAMES = re.compile(r"[^A-Za-z0-9_.\- ]+")


def metric_name(*parts: str) -> str:
    """A metric name MLflow takes: ``/``-separated parts of letters, digits, ``_.- ``; a part
    that is a file path (a perplexity text) is named by its file name."""
    cleaned = [_NOT_IN_METRIC_NAMES.sub("_", part.rsplit("/", 1)[-1]).strip(" .") for part in parts]
    return "/".join(part or "_" for part in cleaned)


@dataclass(frozen=True)
class MlflowTarget:
    tracking_uri: str
    experiment: str
    register_as: str | None = None


def target_for(spec: dict[str, Any], settings: Settings) -> MlflowTarget | str | None:
    """Where the job's run goes, None for nowhere, or why it may not go where asked (the
    allow-list is checked again here: it may have changed since the job was admitted)."""
    section = ((spec.get("tracking") or {}) if isinstance(spec, dict) else {}).get("mlflow")
    if section:
        uri = section.get("tracking_uri")
        if (refusal := settings.mlflow_uri_refusal(uri)) is not None:
            return refusal
        assert settings.mlflow_tracking_uri is not None or uri is not None
        return MlflowTarget(
            (uri or settings.mlflow_tracking_uri or "").rstrip("/"),
            section["experiment"],
            section.get("register_as"),
        )
    if settings.mlflow_tracking_uri:
        return MlflowTarget(settings.mlflow_tracking_uri.rstrip("/"), settings.mlflow_experiment)
    return None


_NOT_IN_MODEL_NAMES = re.compile(r"[^A-Za-z0-9 _.@+-]+")


def registered_name(name: str, tenant: str, settings: Settings) -> str:
    """The registry name of a job's ``register_as``: ``<tenant>.<name>`` so that tenants never
    share or overwrite each other's registered models (``SHORTENED_MLFLOW_REGISTRY_SCOPE``:
    ``global`` registers ``name`` itself). The tenant part keeps only the characters MLflow
    allows in a registered model name."""
    if settings.mlflow_registry_scope == "global":
        return name
    return f"{_NOT_IN_MODEL_NAMES.sub('-', tenant)}.{name}"


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A spec as MLflow params: dotted keys, scalars as text, lists as JSON."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for key, child in value.items():
            out.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    elif value is not None:
        text = json.dumps(value) if isinstance(value, list) else str(value)
        out[prefix] = text[:MAX_PARAM_CHARS]
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def report_metrics(kind: str, report: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) of what a report measured: block scores as a series indexed by
    block, perplexity, zero-shot accuracy, latency and throughput, and summary numbers."""
    metrics: list[tuple[str, float, int]] = []

    def add(name: str, value: Any, step: int = 0) -> None:
        if (number := _number(value)) is not None:
            metrics.append((name, number, step))

    if kind == "prune":
        for block, score in enumerate(report.get("block_scores") or []):
            add("block_score", score, block)
        for key in ("params_before", "params_after", "params_removed_ratio", "num_layers_after"):
            add(key, report.get(key))
        add("num_blocks_removed", report.get("num_blocks_removed"))
    elif kind == "retrain":
        for key, value in report.items():
            if "loss" in key:
                add(key, value)
    elif kind == "eval":
        for role in ("model", "baseline"):
            result = report.get(role) or {}
            prefix = () if role == "model" else ("baseline",)
            for name, ppl in (result.get("perplexity") or {}).items():
                add(
                    metric_name(*prefix, "ppl", name),
                    ppl.get("ppl") if isinstance(ppl, dict) else ppl,
                )
            zero_shot = result.get("zero_shot") or {}
            for task, values in (zero_shot.get("tasks") or {}).items():
                add(metric_name(*prefix, "zero_shot", task), values.get("value"))
            add(metric_name(*prefix, "zero_shot", "mean_accuracy"), zero_shot.get("mean_accuracy"))
            for run in (result.get("efficiency") or {}).get("runs") or []:
                where = f"bs{run.get('batch_size')}_out{run.get('output_length')}"
                add(metric_name(*prefix, "latency_s", where), run.get("latency_s_mean"))
                add(
                    metric_name(*prefix, "throughput_tokens_per_s", where),
                    run.get("throughput_tokens_per_s_mean"),
                )
    for key, value in (report.get("timings") or {}).items():
        add(metric_name("time", key), value)
    return metrics


class NoTracking:
    """Tracking is off for this job."""

    info: dict[str, Any] | None = None

    def on_progress(self, progress: Progress) -> None:
        pass

    def end(self, status: str, report: dict[str, Any] | None, output_dir: Path) -> None:
        pass


def start_tracking(
    sessions: sessionmaker[Session], job: Job, settings: Settings
) -> NoTracking | MlflowRun:
    """The job's tracking: an MLflow run when configured, else nothing (no mlflow import)."""
    target = target_for(job.spec, settings)
    if target is None:
        return NoTracking()
    if isinstance(target, str):
        _warn(sessions, job.id, f"mlflow: not logged: {target}")
        return NoTracking()
    run = MlflowRun(sessions, job, settings, target)
    run.start()
    return run


def _warn(sessions: sessionmaker[Session], job_id: str, message: str) -> None:
    log.warning("job %s: %s", job_id, message)
    with contextlib.suppress(Exception), sessions() as session:
        event_store.append_event(session, job_id, "warning", message, {"integration": "mlflow"})
        session.commit()


def _note(sessions: sessionmaker[Session], job_id: str, message: str, data: dict[str, Any]) -> None:
    with sessions() as session:
        event_store.append_event(session, job_id, "log", message, {"mlflow": data})
        session.commit()


class MlflowRun:
    """One job's MLflow run (through ``MlflowClient``: no process-global active run)."""

    def __init__(
        self, sessions: sessionmaker[Session], job: Job, settings: Settings, target: MlflowTarget
    ) -> None:
        self.sessions = sessions
        self.job_id = job.id
        self.kind = job.kind
        self.tenant = job.tenant
        self.spec = job.spec
        self.settings = settings
        self.target = target
        self.client: Any = None
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.last_pipeline_step = True
        self.broken = False
        self.info: dict[str, Any] | None = None

    def _attempt(self, what: str, call: Callable[[], None]) -> None:
        """Run one exchange with the tracking server; its failure ends the job's tracking."""
        if self.broken:
            return
        try:
            call_with_deadline(call, self.settings.mlflow_call_deadline_s, f"mlflow: {what}")
        except Exception as exc:
            # Stop only when the server is down, failing or too slow: one it answered with a
            # refusal (a bad name, a permission) still takes the rest (ending the run above
            # all). The tenant sees the class of failure; the client library's text (which
            # may quote server URLs and settings) goes to the server log only.
            code = getattr(exc, "error_code", "INTERNAL_ERROR")
            self.broken = isinstance(exc, DeadlineExceeded) or code in SERVER_TROUBLE
            log.warning("job %s: mlflow: %s failed: %r", self.job_id, what, exc)
            reason = "no answer in time" if isinstance(exc, DeadlineExceeded) else code
            _warn(
                self.sessions,
                self.job_id,
                f"mlflow: {what} failed ({reason})"
                + (", the job goes on without tracking" if self.broken else ""),
            )

    def start(self) -> None:
        self._attempt(f"starting the run on {redact_uri(self.target.tracking_uri)}", self._start)

    def _start(self) -> None:
        # Read by mlflow's HTTP client at every request: a down server costs each job
        # at most timeout x (retries + 1), not mlflow's default of minutes.
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(
            max(1, math.ceil(self.settings.mlflow_request_timeout_s))
        )
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.settings.mlflow_request_retries)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        from mlflow import MlflowClient  # only jobs that are tracked pay for the import

        self.client = MlflowClient(tracking_uri=self.target.tracking_uri)
        self.experiment_id = self._experiment_id()
        tags = {
            "shortened.job_id": self.job_id,
            "shortened.kind": self.kind,
            "shortened.tenant": self.tenant,
            "shortened.status": "running",
        }
        self.parent_run_id = self._parent_run(tags)
        if self.parent_run_id is not None:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(
            self.experiment_id, run_name=f"{self.kind} {self.job_id}", tags=tags
        )
        self.run_id = run.info.run_id
        self.info = {
            "tracking_uri": redact_uri(self.target.tracking_uri),
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "parent_run_id": self.parent_run_id,
        }
        _note(self.sessions, self.job_id, f"mlflow: run {self.run_id}", self.info)
        self._log_params(flatten(self.spec))

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.target.experiment)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(self.target.experiment))
        except MlflowException:  # created by another job meanwhile
            return str(self.client.get_experiment_by_name(self.target.experiment).experiment_id)

    def _parent_run(self, tags: dict[str, str]) -> str | None:
        """The pipeline's parent run (created by its first step), None for a plain job."""
        with self.sessions() as session:
            job = job_reads.get_job(session, self.job_id)
            assert job is not None
            root = root_of(session, job)
            planned = planned_kinds(root)
            if root.id == job.id and len(planned) == 1:
                return None
            self.last_pipeline_step = job.kind == planned[-1] and root.id != job.id
            root_id = root.id
            recorded = [
                event.data["mlflow"]["parent_run_id"]
                for event in event_store.list_events(session, root_id)
                if event.type == "log"
                and isinstance(event.data, dict)
                and isinstance(event.data.get("mlflow"), dict)
                and event.data["mlflow"].get("pipeline_run")
            ]
        tags["shortened.root_job_id"] = root_id
        if recorded:
            return str(recorded[-1])
        parent = self.client.create_run(
            self.experiment_id,
            run_name=f"pipeline {root_id}",
            tags={
                "shortened.job_id": root_id,
                "shortened.tenant": self.tenant,
                "shortened.pipeline": " -> ".join(planned),
            },
        )
        _note(
            self.sessions,
            root_id,
            f"mlflow: pipeline run {parent.info.run_id}",
            {
                "pipeline_run": True,
                "parent_run_id": parent.info.run_id,
                "experiment_id": self.experiment_id,
            },
        )
        return str(parent.info.run_id)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key[:250], value) for key, value in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + PARAMS_PER_BATCH])

    def _log_metrics(self, metrics: list[tuple[str, float, int]]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(name, value, now, step) for name, value, step in metrics]
        for start in range(0, len(items), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + METRICS_PER_BATCH])

    def on_progress(self, progress: Progress) -> None:
        """Training losses per optimizer step, as the engine reports them."""
        if progress.stage != "training" or not progress.metrics or self.run_id is None:
            return
        metrics = [
            (f"train/{key}", number, progress.done)
            for key in TRAINING_METRICS
            if (number := _number(progress.metrics.get(key))) is not None
        ]
        if metrics:
            self._attempt("logging training metrics", lambda: self._log_metrics(metrics))

    def end(self, status: str, report: dict[str, Any] | None, output_dir: Path) -> None:
        if self.run_id is None:
            return
        run_id = self.run_id

        def results() -> None:
            if report:
                self._log_metrics(report_metrics(self.kind, report))
            for name in ("report.json", "block_scores.svg", "block_scores.csv"):
                if (output_dir / name).is_file():
                    self.client.log_artifact(run_id, str(output_dir / name))

        def finish() -> None:
            self.client.set_tag(run_id, "shortened.status", status)
            run_status = FINAL_RUN_STATUS.get(status, "FAILED")
            self.client.set_terminated(run_id, status=run_status)
            if self.parent_run_id is not None and (
                status != "succeeded" or self.last_pipeline_step
            ):
                self.client.set_terminated(self.parent_run_id, status=run_status)

        self._attempt("logging the results", results)
        if status == "succeeded" and self.target.register_as and self.kind in MODEL_KINDS:
            name = registered_name(self.target.register_as, self.tenant, self.settings)
            self._attempt("registering the model", lambda: self._register(name))
        self._attempt("ending the run", finish)

    def _register(self, name: str) -> None:
        """A model version whose source is the job's output in the artifact store: the
        checkpoint is already there (with its manifest), so it is not uploaded again."""
        from mlflow.exceptions import MlflowException

        source = f"{self.settings.resolved_artifacts_url.rstrip('/')}/{job_prefix(self.job_id)}"
        try:
            self.client.create_registered_model(
                name,
                tags={"shortened.tenant": self.tenant},
                description="Depth-pruned models published by shortened",
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            name,
            source,
            run_id=self.run_id,
            tags={"shortened.job_id": self.job_id, "shortened.kind": self.kind},
        )
        # The version's source is the store's own URL (the operator's setting): shown as
        # the job's output, which is what it is.
        shown = f"job://{self.job_id}"
        registered = {"name": name, "version": str(version.version), "source": shown}
        assert self.info is not None
        self.info["registered_model"] = registered
        _note(
            self.sessions,
            self.job_id,
            f"mlflow: registered {name} version {version.version}",
            registered,
        )
