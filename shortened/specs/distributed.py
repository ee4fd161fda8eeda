"""Where a retrain job's training runs: one process (the default), ``nproc_per_node``
processes on one worker's devices under ``torchrun`` (FSDP2 or DDP through the HF Trainer's
accelerate integration), or ``nnodes`` machines through the cluster's training operator
(Kubeflow Trainer on Kubernetes, or Ray Train), which the worker submits to and follows."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, WithJsonSchema

from .common import StrictModel

MAX_PROCESSES_PER_NODE = 64  # the most GPUs one machine holds today is 16; CPU ranks for tests
MAX_NODES = 1024


def _processes(value: Any) -> int | str:
    # One validator for the union, so a refusal names the field itself (not a member of it).
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"an integer from 1 to {MAX_PROCESSES_PER_NODE}, or 'auto'")
    if not 1 <= value <= MAX_PROCESSES_PER_NODE:
        raise ValueError(f"must be from 1 to {MAX_PROCESSES_PER_NODE} (or 'auto')")
    return value


ProcessesPerNode = Annotated[
    int | Literal["auto"],
    PlainValidator(_processes),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_PROCESSES_PER_NODE},
                {"type": "string", "enum": ["auto"]},
            ]
        }
    ),
]
Strategy = Literal["fsdp", "ddp"]
ClusterEngine = Literal["kubeflow", "ray"]


class DistributedSpec(StrictModel):
    """How a retrain job's training is spread over devices and machines."""

    nproc_per_node: ProcessesPerNode = Field(
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
