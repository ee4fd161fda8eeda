"""Settings from environment variables (prefix ``SHORTENED_``), shared by API, worker and CLI.

Defaults are the embedded mode: SQLite job store, local artifact directory and a
filesystem broker transport under ``./var``, so ``shortened serve`` needs no other service.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shortened.redact import redact_uri


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TenantLimits(BaseModel):
    """Per-tenant caps (overrides of the global defaults of the same names)."""

    max_concurrent_jobs: int | None = Field(default=None, ge=0)
    max_calibration_samples: int | None = Field(default=None, ge=1)
    max_seq_len: int | None = Field(default=None, ge=2)
    max_schedules: int | None = Field(default=None, ge=0)
    max_webhook_endpoints: int | None = Field(default=None, ge=0)
    min_cron_interval_s: float | None = Field(default=None, ge=1)
    write_rate_per_s: float | None = Field(default=None, gt=0)
    write_burst: int | None = Field(default=None, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHORTENED_", extra="ignore")

    data_dir: Path = Field(
        default=Path("./var"),
        description="Local state: SQLite file, artifacts, broker spool, caches",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/shortened.db"
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker; default filesystem transport under <data_dir>/broker",
    )
    artifacts_url: str | None = Field(
        default=None, description="file:///path or s3://bucket/prefix; default <data_dir>/artifacts"
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO), empty for AWS"
    )
    s3_region: str = Field(default="us-east-1", description="Region of the S3 client")
    admission_timeout_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="How long admission waits for object storage (a HEAD of the model's config.json or a data file) before accepting the job and letting the worker decide",
    )
    presign_expiry_s: int = Field(
        default=3600, gt=0, description="Lifetime of presigned artifact download URLs"
    )
    model_cache_dir: Path | None = Field(
        default=None,
        description="Where s3:// and job:// models are downloaded; default <data_dir>/cache",
    )
    queue: str = Field(default="gpu", description="Celery queue the heavy tasks go to")
    worker_concurrency: int = Field(default=1, ge=1, description="Jobs per worker (one per GPU)")
    worker_max_tasks_per_child: int = Field(
        default=1, ge=1, description="Jobs per worker child process (1: all GPU memory returned)"
    )
    visibility_timeout_s: int = Field(
        default=12 * 3600,
        gt=0,
        description="Redis redelivery timeout of an unacknowledged message; longer than the longest job",
    )
    # --- memory: what a worker has, and what the API may admit -----------------------------
    worker_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="Worker: the memory a job may use here (GB); default the GPU's total "
        "memory when CUDA is present, else unset (no check). The worker refuses a job whose "
        "planned peak exceeds it",
    )
    max_worker_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="API: the largest SHORTENED_WORKER_MEMORY_GB (or GPU memory) of the "
        "workers on this queue; a job whose planned peak exceeds it is refused with 422 "
        "insufficient_memory (unset: no memory check)",
    )
    worker_devices: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Worker: the devices (GPUs) a job may use here, each of worker_memory_gb; "
        "default the visible CUDA devices, else 1. A retrain job's processes "
        "(distributed.nproc_per_node; 'auto' is this count) train one per device, and a "
        "model larger than one device is spread over all of them",
    )
    max_worker_devices: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="API: the largest SHORTENED_WORKER_DEVICES of the workers on this queue; a "
        "retrain asking for more processes per node is refused with 422 insufficient_devices, "
        "and the memory check counts this many devices of max_worker_memory_gb (unset: one "
        "device, and no check of nproc_per_node)",
    )
    worker_device: Literal["cpu", "cuda"] = Field(
        default="cpu",
        description="The kind of device the workers have: what 'auto' means for the memory "
        "plan (bf16 on CUDA, float32 on the CPU), and the only device besides 'cpu' and 'auto' "
        "a job may ask for (`cuda` jobs are refused at admission when the workers are CPUs)",
    )
    api_host: str = Field(default="127.0.0.1", description="Address `shortened serve` listens on")
    api_port: int = Field(
        default=8000, ge=1, le=65535, description="Port `shortened serve` listens on"
    )
    api_workers: int = Field(
        default=0,
        ge=0,
        description="API processes `shortened serve` / `python -m service.serve` runs (0: one per CPU core)",
    )
    api_threads: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Per API process: requests handled at once on worker threads, and the "
        "database connections kept open for them (the pool holds as many, so a request never "
        "waits to connect); with PostgreSQL, status reads run on the event loop with up to a "
        "quarter as many connections of their own (at least 2), so PostgreSQL sees replicas x "
        "API processes x 1.25 x this at most",
    )
    background_loops: bool = Field(
        default=True,
        description="Run the reaper, scheduler and webhook dispatcher threads in this API process "
        "(`serve` with several API processes runs them once, in its supervisor, and sets this off "
        "in the API processes)",
    )
    log_level: str = Field(default="INFO", description="Log level of the API, worker and CLI")
    score_cache: bool = Field(
        default=True,
        description="Reuse block scores across prune jobs (same model content, criterion, calibration); kept under score-cache/ in the artifact store",
    )
    cache_scope: Literal["tenant", "global"] = Field(
        default="tenant",
        description="Who shares the score and evaluation caches: `tenant` (entries are reused only by jobs of the tenant that computed them; no report reveals another tenant's activity or timings) or `global` (every job, for single-team deployments)",
    )
    baseline_cache: bool = Field(
        default=True,
        description="Reuse a parent model's evaluation results across eval jobs (same content, sections, texts, device); kept under eval-cache/ in the artifact store",
    )
    # --- observability: logs and worker metrics --------------------------------------------
    log_format: Literal["json", "text"] | None = Field(
        default=None,
        description="json or text; default json for the API and worker, text for the CLI and `shortened serve`",
    )
    min_free_disk_gb: float = Field(
        default=1.0,
        ge=0,
        description="/readyz reports a local artifact store with less free space than this "
        "(GB) as not ready: a job's outputs would not fit",
    )
    worker_metrics_port: int = Field(
        default=9808,
        ge=0,
        le=65535,
        description="Port of the worker's Prometheus /metrics (0: off)",
    )
    worker_metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the worker's /metrics binds (0.0.0.0 in containers)",
    )

    progress_log_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="Seconds between a running job's progress lines in the worker log (stage, step/total, loss, ETA)",
    )

    # --- reliability: leases, retries, re-dispatch, time limits ---------------------------
    heartbeat_interval_s: float = Field(
        default=10.0, gt=0, description="How often a running job renews its lease"
    )
    lease_ttl_s: float = Field(
        default=60.0,
        gt=0,
        description="A running job whose lease is not renewed for this long is considered lost",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts per job; a job lost (or a training process dead) on its last "
        "attempt fails with worker_lost (training_process_failed)",
    )
    reaper_interval_s: float = Field(
        default=15.0,
        ge=0,
        description="How often the API's reaper runs (0: not in the API; run `python -m service.reaper`)",
    )
    redispatch_after_s: float = Field(
        default=120.0,
        gt=0,
        description="Re-send the message of a job queued this long without being claimed (doubling each time)",
    )
    job_time_limit_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="Wall-clock limit of one attempt; over it the job fails with code timeout",
    )

    # --- schedules (cron) ------------------------------------------------------------------
    scheduler_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="How often the API's scheduler thread looks for due schedule slots (0: not in the API; run `python -m service.scheduler`)",
    )
    schedule_misfire_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="A slot later than this (scheduler down) is missed: only the latest missed slot of a schedule gets a job",
    )

    # --- security: authentication, allowed sources, limits --------------------------------
    auth_required: bool | None = Field(
        default=None, description="Require API keys; default: only when api_host is not loopback"
    )
    default_tenant: str = Field(
        default="default", description="Tenant of requests without a key when auth is not required"
    )
    allowed_local_roots: list[Path] = Field(
        default_factory=lambda: [Path(".")],
        description="Directories local model/data paths must lie under (JSON list)",
    )
    allowed_buckets: list[str] = Field(
        default_factory=list,
        description="Buckets s3:// sources may read (JSON list); none by default",
    )
    hub_allowed: bool = Field(
        default=True, description="Allow Hugging Face Hub models (hf://) and datasets"
    )
    max_request_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest request body accepted (413 above)"
    )
    max_concurrent_jobs: int = Field(
        default=16, ge=0, description="Queued + running jobs per tenant (429 above)"
    )
    max_batch_jobs: int = Field(
        default=64,
        ge=1,
        description="Most jobs one POST /jobs/batch grid may expand to (422 above)",
    )
    max_calibration_samples: int = Field(
        default=4096, ge=1, description="Largest calibration n_samples per job"
    )
    max_seq_len: int = Field(default=8192, ge=2, description="Largest seq_len / cutoff_len per job")
    max_schedules: int = Field(
        default=100, ge=0, description="Schedules per tenant (429 too_many_schedules above)"
    )
    max_webhook_endpoints: int = Field(
        default=20,
        ge=0,
        description="Webhook endpoints per tenant (429 too_many_webhook_endpoints above)",
    )
    min_cron_interval_s: float = Field(
        default=60.0,
        ge=1,
        description="Shortest interval between a schedule's slots (422 on cron below); lower it to allow per-second crons",
    )
    write_rate_per_s: float = Field(
        default=50.0,
        gt=0,
        description="Token bucket of each tenant's write requests (submit, cancel, create, delete, ...): sustained rate per second, per API process (429 rate_limited with Retry-After above)",
    )
    write_burst: int = Field(
        default=2000, ge=1, description="Write requests a tenant may make at once (bucket size)"
    )
    tenant_limits: dict[str, TenantLimits] = Field(
        default_factory=dict,
        description="Per-tenant overrides, JSON: {tenant: {max_concurrent_jobs: ...}}",
    )

    # --- webhooks: signed notifications of job state changes --------------------------------
    webhook_interval_s: float = Field(
        default=1.0,
        ge=0,
        description="How often the API's webhook dispatcher looks for due deliveries (0: not in the API; run `python -m service.webhooks`)",
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, description="Timeout of one webhook POST (connect + response)"
    )
    webhook_retry_schedule_s: list[float] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 3600.0, 21600.0],
        description="Waits before each retry of a failed delivery (JSON list); gives up after the last",
    )
    webhook_retry_jitter: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Each wait is scaled by a random factor in [1 - jitter, 1 + jitter]",
    )
    webhook_concurrency: int = Field(
        default=4, ge=1, le=64, description="Deliveries one dispatcher sends at the same time"
    )
    webhook_batch_size: int = Field(
        default=50, ge=1, le=1000, description="Deliveries one dispatcher claims per round"
    )
    webhook_allow_private_targets: bool | None = Field(
        default=None,
        description="Allow webhook URLs on loopback/private/link-local addresses; default: only in the keyless local mode (auth not required)",
    )
    webhook_links_base_url: str | None = Field(
        default=None,
        description="Public base URL of the API, prefixed to the links in webhook payloads (default: relative links)",
    )

    # --- platform integration: MLflow ------------------------------------------------------
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking server (http(s) URL) every job is logged to; a spec's "
        "tracking.mlflow section may also name it or one of mlflow_allowed_tracking_uris",
    )
    mlflow_experiment: str = Field(
        default="shortened",
        description="Experiment of jobs whose spec names none (with mlflow_tracking_uri)",
    )
    mlflow_allowed_tracking_uris: list[str] = Field(
        default_factory=list,
        description="Further tracking servers a spec's tracking.mlflow.tracking_uri may name "
        "(JSON list); the worker calls no other",
    )
    mlflow_request_timeout_s: float = Field(
        default=10.0, gt=0, le=600, description="Timeout of one request to the tracking server"
    )
    mlflow_request_retries: int = Field(
        default=1,
        ge=0,
        le=10,
        description="Retries of a failed request to the tracking server (each job waits for "
        "them, so few: tracking never fails a job, but it can slow one)",
    )
    mlflow_call_deadline_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Longest a job waits for one exchange with the tracking server, whatever "
        "the server does (a slow-drip answer included); past it the job goes on without tracking",
    )
    mlflow_registry_scope: Literal["tenant", "global"] = Field(
        default="tenant",
        description="Registered model names: `tenant` registers `register_as` as "
        "`<tenant>.<register_as>` so that tenants never share or overwrite each other's "
        "models; `global` registers the name as given (single-team deployments)",
    )

    # --- platform integration: multi-node training on the cluster's training operator ---
    kubeflow_runtime: str | None = Field(
        default=None,
        description="ClusterTrainingRuntime (Kubeflow Trainer, torch) that the TrainJobs of "
        "multi-node retrain jobs (distributed.nnodes > 1, engine kubeflow) reference, e.g. "
        "torch-distributed; unset: such jobs are refused at admission",
    )
    kubeflow_image: str | None = Field(
        default=None,
        description="Image of the training pods: this project's worker image (the pods run "
        "`python -m shortened.engine.retrain.rank_main`); required with kubeflow_runtime",
    )
    kubeflow_namespace: str = Field(
        default="shortened",
        description="Namespace the worker creates its TrainJobs in (where its Role allows it)",
    )
    kubeflow_kubeconfig: Path | None = Field(
        default=None,
        description="kubeconfig file the worker reaches the Kubernetes API with; unset: the "
        "in-cluster configuration (the worker pod's ServiceAccount token)",
    )
    kubeflow_secret_name: str = Field(
        default="shortened-secrets",
        description="Secret the training pods read the artifact store's credentials from, by "
        "reference (the values are never copied into a TrainJob)",
    )
    kubeflow_secret_keys: list[str] = Field(
        default_factory=lambda: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
        description="Keys of kubeflow_secret_name given to the training pods as environment "
        "variables of the same names (JSON list)",
    )
    kubeflow_poll_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="How often the worker reads its TrainJob's status and checks the job for "
        "a cancel while the training runs on the cluster",
    )

    def cluster_engine_refusal(self, engine: str) -> str | None:
        """Why a multi-node job on ``engine`` cannot run here (None: it can). The training
        pods write their output to the artifact store, so it must be one they reach (S3)."""
        if engine != "kubeflow":
            return f"{engine} engine is not configured on this server"
        if not self.kubeflow_runtime or not self.kubeflow_image:
            return (
                "kubeflow engine is not configured on this server (SHORTENED_KUBEFLOW_RUNTIME "
                "and SHORTENED_KUBEFLOW_IMAGE); use nnodes 1"
            )
        if not self.resolved_artifacts_url.startswith("s3://"):
            return (
                "kubeflow engine needs an s3:// artifact store (SHORTENED_ARTIFACTS_URL) that "
                "the training pods can write to"
            )
        return None

    def mlflow_uri_refusal(self, uri: str | None) -> str | None:
        """Why a spec's tracking server may not be used here (None: it may). Only the
        configured servers: the worker must not be made to call a host of the tenant's
        choosing (an internal service, a metadata endpoint)."""
        allowed = [
            u.rstrip("/")
            for u in (self.mlflow_tracking_uri, *self.mlflow_allowed_tracking_uris)
            if u
        ]
        if uri is None:
            return (
                None
                if self.mlflow_tracking_uri
                else "no MLflow tracking server is configured on this server"
            )
        if uri.rstrip("/") in allowed:
            return None
        shown = [redact_uri(u) or "" for u in allowed]
        return (
            "this MLflow tracking server is not allowed here; use the server's default (omit tracking_uri)"
            + (f" or one of {', '.join(shown)}" if len(allowed) > 1 else "")
        )

    @property
    def resolved_webhook_allow_private_targets(self) -> bool:
        if self.webhook_allow_private_targets is None:
            return not self.resolved_auth_required
        return self.webhook_allow_private_targets

    @property
    def resolved_auth_required(self) -> bool:
        if self.auth_required is None:
            return not is_loopback_host(self.api_host)
        return self.auth_required

    def check_auth_binding(self) -> None:
        """Refuse to serve without API keys on anything but a loopback address."""
        if not self.resolved_auth_required and not is_loopback_host(self.api_host):
            raise RuntimeError(
                f"auth_required is false but api_host is {self.api_host!r}: API keys are required on "
                "any non-loopback address (create one with `python -m service.keys create`)"
            )

    def limits_for(self, tenant: str) -> TenantLimits:
        """The effective limits of ``tenant``: its overrides, else the global defaults
        (every field set)."""
        override = self.tenant_limits.get(tenant) or TenantLimits()
        return TenantLimits(
            **{
                name: value
                if (value := getattr(override, name)) is not None
                else getattr(self, name)
                for name in TenantLimits.model_fields
            }
        )

    @property
    def resolved_api_workers(self) -> int:
        if self.api_workers:
            return self.api_workers
        try:  # the cores this process may run on (a container's CPU set), not the machine's
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'shortened.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_artifacts_url(self) -> str:
        return self.artifacts_url or f"file://{(self.data_dir / 'artifacts').resolve()}"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return (self.model_cache_dir or self.data_dir / "cache").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_reference() -> str:
    """The Markdown table of every setting (``docs/configuration.md``), from the fields
    themselves: one source for names, defaults and meanings."""
    import json

    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if default is None:
            shown = "unset"
        elif isinstance(default, (list, dict, bool)):
            shown = f"`{json.dumps(default, default=str)}`"
        else:
            shown = f"`{default}`"
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `SHORTENED_{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"
