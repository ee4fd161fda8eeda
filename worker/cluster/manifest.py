"""The TrainJob the worker submits for a multi-node retrain job, rendered by pure functions.

A Kubeflow Trainer ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``) names a torch
``ClusterTrainingRuntime`` (``SHORTENED_KUBEFLOW_RUNTIME``) and overrides its trainer: our
image, ``nnodes`` nodes of ``nproc_per_node`` processes, one GPU per process. The runtime's
torch plugin sets torchrun's ``PET_*`` variables (nodes, processes, node rank, rendezvous
address) on every node, so the command is ``torchrun --module
shortened.engine.retrain.rank_main`` and each rank runs ``python -m
shortened.engine.retrain.rank_main`` with the job's spec inline as JSON. Rank 0 prints its
progress as marked lines (``shortened.engine.progress_wire``) and, when training ends,
publishes the output directory with its manifest under the attempt's staging prefix of the
artifact store, which the worker verifies and publishes as the job's artifacts.

Settings reach the pods as plain values; credentials only as references to a Secret
(``secretKeyRef``), never as values. Labels carry the job id, the attempt and the tenant.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from shortened.config import Settings

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
# The torch runtimes' replicated job and trainer container (torch-distributed and its kin):
# node i is completion index i of the "node" Job, and rank 0 runs in the pod of node 0.
NODE_JOB = "node"
NODE_CONTAINER = "node"
RANK_MAIN = "shortened.engine.retrain.rank_main"
# Who owns the runtime patch below (the Trainer keys patches by manager).
PATCH_MANAGER = "shortened"

SCRATCH_DIR = "/scratch"
OUTPUT_DIR = f"{SCRATCH_DIR}/output"
# The container default (64 MiB) is too small for NCCL and data-loader workers.
SHM_SIZE = "8Gi"
POD_USER = 10001  # the worker image's user (Dockerfile)

LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_JOB_ID = "shortened/job-id"
LABEL_ATTEMPT = "shortened/attempt"
LABEL_TENANT = "shortened/tenant"
ANNOTATION_TENANT = "shortened/tenant"

_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass(frozen=True)
class ClusterTarget:
    """Where and how the worker's TrainJobs run (from the settings)."""

    namespace: str
    runtime: str
    image: str
    env: dict[str, str]  # plain settings the pods need (the artifact store's address)
    secret_name: str
    secret_keys: tuple[str, ...]  # given by reference, under the same names
    gpu: bool  # one nvidia.com/gpu per process (else CPU ranks)


@dataclass(frozen=True)
class TrainJobRequest:
    """One attempt of one multi-node job."""

    job_id: str
    tenant: str
    attempt: int
    spec: dict[str, Any]  # the retrain spec, JSON-able
    nnodes: int
    nproc_per_node: int
    staging_prefix: str
    deadline_s: int | None  # what is left of the job's time limit


def cluster_target(settings: Settings) -> ClusterTarget:
    """The target the settings name (``cluster_engine_refusal`` has said it is complete)."""
    assert settings.kubeflow_runtime and settings.kubeflow_image
    env = {
        "SHORTENED_ARTIFACTS_URL": settings.resolved_artifacts_url,
        "SHORTENED_S3_REGION": settings.s3_region,
        "SHORTENED_DATA_DIR": SCRATCH_DIR,
        "SHORTENED_LOG_LEVEL": settings.log_level,
    }
    if settings.s3_endpoint_url:
        env["SHORTENED_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return ClusterTarget(
        namespace=settings.kubeflow_namespace,
        runtime=settings.kubeflow_runtime,
        image=settings.kubeflow_image,
        env=env,
        secret_name=settings.kubeflow_secret_name,
        secret_keys=tuple(settings.kubeflow_secret_keys),
        gpu=settings.worker_device == "cuda",
    )


def train_job_name(job_id: str, attempt: int) -> str:
    """A DNS label short enough for the pod names the JobSet derives from it."""
    return f"shortened-{job_id[:16].lower()}-a{attempt}"


def tenant_label(tenant: str) -> str:
    """The tenant as a label value: itself when it is one, else a digest (the annotation
    keeps the name)."""
    if _LABEL_VALUE.match(tenant):
        return tenant
    return "sha256-" + hashlib.sha256(tenant.encode()).hexdigest()[:40]


def job_labels(job_id: str, tenant: str, attempt: int) -> dict[str, str]:
    return {
        LABEL_PART_OF: "shortened",
        LABEL_JOB_ID: job_id,
        LABEL_ATTEMPT: str(attempt),
        LABEL_TENANT: tenant_label(tenant),
    }


def rank_arguments(request: TrainJobRequest) -> list[str]:
    """What every rank is given (the contract with ``rank_main``)."""
    return [
        "--spec-json",
        json.dumps(request.spec, separators=(",", ":"), sort_keys=True),
        "--job-id",
        request.job_id,
        "--output-dir",
        OUTPUT_DIR,
        "--publish-to",
        request.staging_prefix,
    ]


def pod_env(target: ClusterTarget) -> list[dict[str, Any]]:
    """Plain settings by value, credentials by reference to the Secret."""
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(target.env.items())]
    env += [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": target.secret_name, "key": key}}}
        for key in target.secret_keys
    ]
    return env


def _resources(target: ClusterTarget, nproc: int) -> dict[str, Any]:
    if not target.gpu:
        return {}
    gpus = {"nvidia.com/gpu": str(nproc)}
    return {"resourcesPerNode": {"requests": dict(gpus), "limits": dict(gpus)}}


def _pod_patch(target: ClusterTarget, labels: dict[str, str]) -> dict[str, Any]:
    """Scratch space and shared memory on every node, as the worker pod has them; non-root."""
    spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": POD_USER,
            "runAsGroup": POD_USER,
            "fsGroup": POD_USER,
        },
        "volumes": [
            {"name": "scratch", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
        ],
        "containers": [
            {
                "name": NODE_CONTAINER,
                "volumeMounts": [
                    {"name": "scratch", "mountPath": SCRATCH_DIR},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
    }
    if target.gpu:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    pod = {"metadata": {"labels": labels}, "spec": spec}
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [{"name": NODE_JOB, "template": {"spec": {"template": pod}}}]
                }
            }
        },
    }


def render_train_job(target: ClusterTarget, request: TrainJobRequest) -> dict[str, Any]:
    """The TrainJob object for one attempt."""
    labels = job_labels(request.job_id, request.tenant, request.attempt)
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": target.runtime},
        "trainer": {
            "image": target.image,
            "command": ["torchrun", "--module", RANK_MAIN],
            "args": rank_arguments(request),
            "numNodes": request.nnodes,
            "numProcPerNode": request.nproc_per_node,
            **_resources(target, request.nproc_per_node),
            "env": pod_env(target),
        },
        "runtimePatches": [_pod_patch(target, labels)],
    }
    if request.deadline_s is not None:
        # A worker that dies leaves its TrainJob behind: the operator still ends it when
        # the job's own time is up.
        spec["activeDeadlineSeconds"] = max(1, request.deadline_s)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": train_job_name(request.job_id, request.attempt),
            "namespace": target.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_TENANT: request.tenant},
        },
        "spec": spec,
    }


def rank0_selector(name: str) -> str:
    """The label selector of the pod that runs node 0 (ranks 0..nproc-1, rank 0 among them)."""
    return ",".join(
        (
            f"jobset.sigs.k8s.io/jobset-name={name}",
            f"jobset.sigs.k8s.io/replicatedjob-name={NODE_JOB}",
            "batch.kubernetes.io/job-completion-index=0",
        )
    )
