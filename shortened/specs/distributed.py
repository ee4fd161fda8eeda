"""Where a retrain job's training runs: one process (the default), ``nproc_per_node``
processes on one worker's devices under ``torchrun`` (FSDP2 or DDP through the HF Trainer's
accelerate integration), or ``nnodes`` machines through the cluster's training operator
(Kubeflow Trainer on Kubernetes, or Ray Train), which the worker submits to and follows."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .common import StrictModel

MAX_PROCESSES_PER_NODE = 64  # the most GPUs one machine holds today is 16; CPU ranks for tests
MAX_NODES = 1024

Processes = Annotated[int, Field(ge=1, le=MAX_PROCESSES_PER_NODE)]
Strategy = Literal["fsdp", "ddp"]
ClusterEngine = Literal["kubeflow", "ray"]


class DistributedSpec(StrictModel):
    """How a retrain job's training is spread over devices and machines."""

    nproc_per_node: Processes | Literal["auto"] = Field(
        default=1,
        description="Training processes per machine (one per device); 'auto': one per visible "
        "GPU of the worker",
    )
    strategy: Strategy = Field(
        default="fsdp",
        description="fsdp: parameters, gradients and optimizer states sharded over the ranks "
        "(FSDP2); ddp: replicated, gradients all-reduced",
    )
    nnodes: int = Field(
        default=1,
        ge=1,
        le=MAX_NODES,
        description="Machines; more than one runs on the cluster's training operator",
    )
    engine: ClusterEngine = Field(
        default="kubeflow",
        description="The cluster's training operator for nnodes > 1 (kubeflow: a TrainJob; "
        "ray: a Ray Train job on the configured Ray cluster)",
    )
