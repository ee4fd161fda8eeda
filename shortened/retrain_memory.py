"""The memory of a retrain job's training stages, per device: LoRA, CPT and KD on one
process, or spread over ``distributed.nproc_per_node`` processes with FSDP (weights,
gradients and AdamW states divided by N) or DDP (replicated). ``shortened.planning`` holds
the shared model (``_Shape``, the constants) and the other kinds' plans; this module plans a
retrain job and its training stages (a pipeline's retrain section too), resolves
``nproc_per_node: auto``, and finds how many devices a job that does not fit would need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from shortened.param_estimates import layer_param_list, text_config, total_params
from shortened.planning import (
    DTYPE_BYTES,
    GRADIENT_CHECKPOINTING,
    LOGIT_COPIES,
    PARENT_LAYERS,
    RUNTIME_BYTES,
    WEIGHT_MULTIPLE,
    Plan,
    StagePlan,
    _device_type,
    _loaded_plan,
    _Shape,
    _stage,
)
from shortened.specs import RetrainSpec


def plan_retrain(spec: BaseModel, config: dict[str, Any], auto_device: str = "cpu") -> Plan:
    """A retrain job: load its model, train it."""
    assert isinstance(spec, RetrainSpec)
    plan = _loaded_plan(
        "retrain", spec, config, auto_device, training_stages, writes_checkpoint=True
    )
    wanted = spec.distributed.nproc_per_node
    plan.processes = wanted if isinstance(wanted, int) else 1  # "auto": resolved by the caller
    plan.strategy = spec.distributed.strategy if plan.processes > 1 else None
    return plan


def training_stages(spec: BaseModel, config: dict[str, Any], auto_device: str) -> list[StagePlan]:
    """The stages of a retrain job or pipeline section, after its model is loaded: the peak
    of one device, for the spec's processes (``distributed``; see :class:`Spread`)."""
    assert isinstance(spec, RetrainSpec)
    device = _device_type(spec.device, auto_device)
    spread = Spread.of(spec)
    shape, total = _Shape(config), total_params(config)
    runtime = RUNTIME_BYTES[device]
    tokens = spec.micro_batch_size * spec.cutoff_len  # per rank: each has its own micro-batch
    stages = []
    if spec.method in ("cpt", "cpt_lora"):
        b = DTYPE_BYTES[_training_dtype(spec, device, adapter_only=False)]
        activations = _train_activations(spec, shape, tokens, b, device)
        units = spread.gathered(config, b)
        stages.append(
            _stage(
                spread.name("retrain cpt"),
                {
                    "runtime": runtime,
                    spread.label("weights+grads+adamw"): spread.states(4 * total * b),
                    **spread.replication(total * b),
                    **units,
                    "activations": activations,
                },
            )
        )
    if spec.method in ("lora", "cpt_lora"):
        b = DTYPE_BYTES[_training_dtype(spec, device, adapter_only=True)]
        activations = _train_activations(spec, shape, tokens, b, device)
        stages.append(
            _stage(
                spread.name("retrain lora"),
                {
                    "runtime": runtime,
                    spread.label("weights"): spread.states(WEIGHT_MULTIPLE["lora"] * total * b),
                    **spread.gathered(config, b),
                    "activations": activations,
                },
            )
        )
    if spec.method == "kd" and spec.kd is not None:
        stages.append(_kd_stage(spec, config, device, spread))
    for stage in stages:
        stage.per_device = True  # each process trains on its own device
    return stages


def _training_dtype(spec: RetrainSpec, device: str, *, adapter_only: bool) -> str:
    """As choose_precision: adapter-only training on CUDA freezes the base in half precision,
    full-parameter training (CPT, KD) keeps fp32 weights under autocast."""
    if spec.dtype != "auto":
        return spec.dtype
    return "bfloat16" if device == "cuda" and adapter_only else "float32"


def _train_activations(
    spec: RetrainSpec, shape: _Shape, tokens: int, b: int, device: str, layers: int | None = None
) -> int:
    checkpointing = (
        spec.gradient_checkpointing if spec.gradient_checkpointing is not None else device == "cuda"
    )
    activations = shape.backward(tokens, b, layers)
    return int(activations * GRADIENT_CHECKPOINTING) if checkpointing else activations


def _kd_stage(spec: RetrainSpec, config: dict[str, Any], device: str, spread: Spread) -> StagePlan:
    """KD: the student trained (every weight, or a LoRA adapter) on packed blocks, the frozen
    teacher's forward on the same blocks, and one chunk of both models' vocabulary logits at
    a time (``distillation.py``). The teacher is the unpruned parent: in a pipeline its
    block count is the pruned job's (``config_after`` keeps it); a job on its own plans it
    as large as the student (its config is not read)."""
    kd = spec.kd
    assert kd is not None
    b = DTYPE_BYTES[_training_dtype(spec, device, adapter_only=kd.lora)]
    teacher_config = teacher_shape(config)
    student, teacher = total_params(config), total_params(teacher_config)
    seq_len = kd.seq_len or min(
        KD_DEFAULT_SEQ_LEN, int(text_config(config).get("max_position_embeddings", 2048))
    )
    tokens = spec.micro_batch_size * seq_len
    shape = _Shape(config)
    trained = (1 if kd.lora else 4) * student * b  # frozen base, or weights+grads+AdamW
    chunk_logits = 2 * min(tokens, kd.chunk_size) * shape.vocab * 4 * LOGIT_COPIES
    parts = {
        "runtime": RUNTIME_BYTES[device],
        spread.label("student" if kd.lora else "student weights+grads+adamw"): spread.states(
            trained
        ),
        spread.label("teacher"): spread.states(teacher * b),
        **({} if kd.lora else spread.replication(student * b)),
        **spread.gathered(config, b, "student"),
        **spread.gathered(teacher_config, b, "teacher"),
        "activations": _train_activations(spec, shape, tokens, b, device)
        - shape.logits(tokens, b)  # the head runs a chunk at a time, never on every position
        + _Shape(teacher_config).forward(tokens, b)
        + chunk_logits,
    }
    return _stage(spread.name("retrain kd"), parts)


KD_DEFAULT_SEQ_LEN = 2048  # as the engine's CPT_DEFAULT_SEQ_LEN


def teacher_shape(config: dict[str, Any]) -> dict[str, Any]:
    """The KD teacher's config: the pruned model's parent, when the config says its block
    count, else the model itself."""
    layers = config.get(PARENT_LAYERS)
    if layers is None:
        return config
    if isinstance(config.get("text_config"), dict):
        return {**config, "text_config": {**config["text_config"], "num_hidden_layers": layers}}
    return {**config, "num_hidden_layers": layers}


PREFETCHED_BLOCKS = 2  # FSDP2 gathers the next block while the current one computes


@dataclass(frozen=True)
class Spread:
    """How a retrain stage's memory divides over its processes (one per device).

    ``fsdp``: weights, gradients and AdamW states sharded (``/N`` on each device), plus what
    is gathered whole while it computes: the current and the prefetched decoder block, and
    the root unit (embeddings, final norm, head), kept for the step. ``ddp``: every device
    holds everything, plus DDP's gradient buckets (a flat copy of the gradients).
    Activations are per device either way: each rank runs its own micro-batch.
    """

    processes: int = 1
    strategy: str = "single"

    @classmethod
    def of(cls, spec: RetrainSpec) -> Spread:
        wanted = spec.distributed.nproc_per_node
        processes = wanted if isinstance(wanted, int) else 1  # "auto": resolve it first
        if processes == 1:
            return cls()
        return cls(processes, spec.distributed.strategy)

    def name(self, stage: str) -> str:
        if self.processes == 1:
            return stage
        return f"{stage} ({self.strategy}, {self.processes} devices, per device)"

    def label(self, part: str) -> str:
        return f"{part}/{self.processes}" if self.strategy == "fsdp" else part

    def states(self, total_bytes: float) -> float:
        return total_bytes / self.processes if self.strategy == "fsdp" else total_bytes

    def replication(self, grads_bytes: float) -> dict[str, float]:
        return {"ddp gradient buckets": grads_bytes} if self.strategy == "ddp" else {}

    def gathered(self, config: dict[str, Any], b: int, model: str = "") -> dict[str, float]:
        if self.strategy != "fsdp":
            return {}
        blocks = layer_param_list(config)
        outside = total_params(config) - sum(blocks)
        whole = PREFETCHED_BLOCKS * max(blocks) + outside
        return {f"gathered {model} units".replace("  ", " "): whole * b}


def spread_over(spec: BaseModel, processes: int, strategy: str = "fsdp") -> BaseModel:
    """``spec`` with its retraining (a retrain job's, or a pipeline's retrain section) on
    ``processes`` devices."""
    distributed = {"nproc_per_node": processes, "strategy": strategy}
    if isinstance(spec, RetrainSpec):
        return spec.model_copy(
            update={"distributed": spec.distributed.model_copy(update=distributed)}
        )
    section = getattr(spec, "retrain", None)
    if isinstance(section, RetrainSpec):
        return spec.model_copy(update={"retrain": spread_over(section, processes, strategy)})
    return spec


def resolve_processes(spec: BaseModel, devices: int | None) -> BaseModel:
    """``nproc_per_node: auto`` as the workers' device count (one when unknown)."""
    retrain = spec if isinstance(spec, RetrainSpec) else getattr(spec, "retrain", None)
    if not isinstance(retrain, RetrainSpec) or retrain.distributed.nproc_per_node != "auto":
        return spec
    return spread_over(spec, devices or 1, retrain.distributed.strategy)


def requested_processes(spec: BaseModel) -> int | None:
    """The processes per machine a spec's retraining asks for (None: none, or ``auto``)."""
    retrain = spec if isinstance(spec, RetrainSpec) else getattr(spec, "retrain", None)
    if not isinstance(retrain, RetrainSpec):
        return None
    wanted = retrain.distributed.nproc_per_node
    return wanted if isinstance(wanted, int) else None


def devices_to_fit(
    plan_for: Callable[[int], Plan | None], limit_bytes: int, most: int
) -> int | None:
    """The fewest devices of ``limit_bytes`` each (a worker with that many, the training
    FSDP over them) that hold the whole job, at most ``most``; None when even that many do
    not (or the job has no training to spread)."""
    from shortened.planning import insufficient_memory

    for processes in range(2, most + 1):
        plan = plan_for(processes)
        if plan is not None and insufficient_memory(plan, limit_bytes, processes) is None:
            return processes
    return None


def too_many_processes(spec: BaseModel, most_devices: int | None) -> tuple[list[str], str] | None:
    """Where and why a spec's retraining asks for more processes per node than the largest
    worker has devices (one process per device), or None."""
    wanted = requested_processes(spec)
    if wanted is None or most_devices is None or wanted <= most_devices:
        return None
    where = [] if isinstance(spec, RetrainSpec) else ["retrain"]
    return [*where, "distributed", "nproc_per_node"], (
        f"{wanted} training processes per node, but the largest worker has {most_devices} "
        f"device(s); ask for at most {most_devices}, or 'auto' (one per device of the worker)"
    )
