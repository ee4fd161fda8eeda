"""The plan of a job before any work: from ``config.json`` alone (no torch, no weights), the
parameters before and after, the blocks protected and removable, the size of the saved model
and the peak memory of every stage.

Memory model (bytes; ``W`` = the weights in the compute dtype, ``b`` its bytes per value,
``B`` windows per forward, ``S`` tokens per window, ``H``/``I``/``V``/``L`` hidden,
intermediate, vocabulary size and layer count)::

    peak(stage) = RUNTIME + WEIGHT_MULTIPLE[stage] * W + extra(stage) + activations(stage)

* ``RUNTIME``: Python with torch and transformers imported (CPU resident memory; 0 on CUDA,
  where the figure is allocated device memory).
* load: the weights once: transformers fills a model built on the meta device from the
  memory-mapped safetensors files. In the checkpoint's own dtype the weights are those mapped
  pages; cast to another dtype (a bf16 checkpoint computed in float32) the mapped source
  pages stay resident next to the converted weights until loading ends (file-backed and
  reclaimable, but counted in the resident size).
* forward-only scoring (ppl, iterative_ppl, block_influence, angular, magnitude): the hidden
  states of one forward, ``B*S*(HIDDEN_COPIES*H + MLP_COPIES*I)*b``, and the LM head in chunks
  of :func:`head_chunk_tokens` tokens (fp32 logits within ``HEAD_CHUNK_BYTES``, and their
  log-softmax).
* taylor: a backward through the whole model keeps every block's activations,
  ``L*B*S*(STORED_H*H + STORED_I*I)*b``, and the full fp32 logits of the forward with their
  gradient; with more than one forward the block gradients add up (the block weights once
  more), with one they are reduced and freed as they complete.
* save: the pruned weights, cast to the source dtype tensor by tensor (no shard-sized copy
  is made while writing: measured).
* LoRA: the base weights frozen in the compute dtype, the adapters and their optimizer state
  (small), training activations as for taylor (a ``GRADIENT_CHECKPOINTING`` fraction when on).
* CPT: weights, gradients and AdamW's two states, all in the compute dtype, plus activations.
* eval perplexity: the weights and one batch's full logits (fp32, with the per-token loss).

The constants are calibrated by ``bench/bench_scale.py`` (a Llama-3.2-1B-shaped model on a
CPU, bf16 and fp32); its report gives the estimate next to every measured peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel

from shortened.engine.families import (
    EXPERT_COUNT_FIELDS,
    adapter_for_model_type,
    expert_keep_problem,
    expert_pruning_refusal,
    experts_kept,
    num_experts,
)
from shortened.param_estimates import (
    active_params,
    block_params,
    layer_param_list,
    text_config,
    total_params,
)
from shortened.specs import EvalSpec, PruneSpec, RetrainSpec, SearchSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_BYTES = {"cpu": 350 * 10**6, "cuda": 0}
WEIGHT_MULTIPLE = {"load": 1.0, "scoring": 1.0, "taylor": 1.0, "save": 1.0, "lora": 1.0}
HIDDEN_COPIES, MLP_COPIES = 8, 4
STORED_H, STORED_I = 12, 5
# The fp32 logits of one LM-head call while scoring from hidden states
# (shortened.engine.criteria.nll_from_hidden): 65 tokens with a 128K vocabulary, 262 with 32K.
HEAD_CHUNK_BYTES = 32 * 2**20
LOGIT_COPIES = 3  # fp32 logits, log-softmax, the loss's gradient / per-token losses
GRADIENT_CHECKPOINTING = 0.15
FORWARD_CRITERIA = ("ppl", "iterative_ppl", "block_influence", "angular", "magnitude")
GB = 10**9
PARENT_LAYERS = "_parent_num_hidden_layers"  # what config_after keeps of the parent (KD)


@dataclass
class StagePlan:
    name: str
    peak_bytes: int
    formula: str
    # The peak of each device of a training stage (one process per device). Other stages
    # hold one model, spread over a worker's devices (device_map="auto") when it needs more.
    per_device: bool = False


@dataclass
class Plan:
    """What a job will do and need, estimated from the model's config."""

    kind: str
    model_type: str
    num_layers: int
    device: str
    compute_dtype: str
    output_dtype: str
    params_before: int
    params_after: int
    block_params: int
    weight_bytes: int  # the weights in the compute dtype
    output_bytes: int  # safetensors weights as saved (the source's dtype)
    protected_blocks: list[int] = field(default_factory=list)
    removable_blocks: list[int] = field(default_factory=list)
    num_blocks: int = 0
    # Per token: a mixture-of-experts model's routed experts counted num_experts_per_tok
    # times (dense models: equal to the totals). ratio_of: what a target_ratio counted.
    active_params_before: int = 0
    active_params_after: int = 0
    ratio_of: str = "total"
    # Expert pruning: the routed experts of each MoE block before and after (0: none pruned).
    experts_before: int = 0
    experts_after: int = 0
    stages: list[StagePlan] = field(default_factory=list)
    # A retrain job's training processes on one machine and how they share the model
    # (fsdp/ddp; None on one process): its stage peaks are per device.
    processes: int = 1
    strategy: str | None = None

    @property
    def peak_bytes(self) -> int:
        return max(stage.peak_bytes for stage in self.stages)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda stage: stage.peak_bytes).name

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_bytes": self.peak_bytes, "peak_stage": self.peak_stage}


def head_chunk_tokens(vocab_size: int) -> int:
    """Tokens per LM-head call when scoring: as many as keep their fp32 logits within
    ``HEAD_CHUNK_BYTES`` (at least one)."""
    return max(1, HEAD_CHUNK_BYTES // (4 * vocab_size))


def removable_blocks(num_layers: int, protect_first: int, protect_last: int) -> list[int]:
    """Original indices that may be removed: all but the first and last protected blocks."""
    return list(range(min(protect_first, num_layers), max(num_layers - protect_last, 0)))


def blocks_for_ratio(total: int, per_block: Sequence[int], ratio: float, max_blocks: int) -> int:
    """The block count whose removal brings the removed-parameter fraction closest to ``ratio``."""
    mean_block = sum(per_block) / len(per_block)
    return min(range(1, max_blocks + 1), key=lambda k: (abs(k * mean_block / total - ratio), k))


def _device_type(device: str, auto_device: str) -> str:
    return auto_device if device == "auto" else ("cuda" if device.startswith("cuda") else "cpu")


def compute_dtype(dtype: str, device_type: str) -> str:
    """As ``shortened.engine.models.pick_dtype``: auto is bf16 on CUDA, fp32 on the CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device_type == "cuda" else "float32"


def source_dtype(config: dict[str, Any]) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in DTYPE_BYTES else "float32"


class _Shape:
    def __init__(self, config: dict[str, Any]) -> None:
        config = text_config(config)
        self.hidden = int(config["hidden_size"])
        self.intermediate = int(config["intermediate_size"])
        self.vocab = int(config["vocab_size"])
        self.layers = int(config["num_hidden_layers"])

    def forward(self, tokens: int, b: int) -> int:
        hidden = tokens * (HIDDEN_COPIES * self.hidden + MLP_COPIES * self.intermediate) * b
        return hidden + min(tokens, head_chunk_tokens(self.vocab)) * self.vocab * 4 * LOGIT_COPIES

    def backward(self, tokens: int, b: int, layers: int | None = None) -> int:
        stored = (layers or self.layers) * tokens
        stored *= (STORED_H * self.hidden + STORED_I * self.intermediate) * b
        return stored + tokens * self.vocab * (b + 4 * LOGIT_COPIES)

    def logits(self, tokens: int, b: int) -> int:
        return tokens * self.vocab * (b + 4 * LOGIT_COPIES)


def _stage(name: str, parts: dict[str, float]) -> StagePlan:
    formula = " + ".join(f"{key} {value / GB:.2f}" for key, value in parts.items() if value)
    return StagePlan(name, int(sum(parts.values())), formula + " GB")


def plan_prune(spec: BaseModel, config: dict[str, Any], auto_device: str = "cpu") -> Plan:
    """A prune job alone (its pipeline sections' stages are ``shortened.kinds``' to add)."""
    assert isinstance(spec, PruneSpec)
    return _pruning_plan("prune", spec, spec.criterion, spec.num_blocks, config, auto_device)


def plan_search(spec: BaseModel, config: dict[str, Any], auto_device: str = "cpu") -> Plan:
    """A search: its costliest criterion's scoring (Taylor+ when tried) and the largest block
    count of its budget (the candidates are evaluated one at a time, as a forward)."""
    assert isinstance(spec, SearchSpec)
    layers = _Shape(config).layers
    most = min(len(removable_blocks(layers, spec.protect_first, spec.protect_last)), layers - 1)
    count: int | None = None
    if spec.num_blocks is not None:
        count = min(spec.num_blocks.max, most)
    elif spec.min_speedup is not None:
        count = most
    criterion = "taylor" if "taylor" in spec.criteria else spec.criteria[0]
    return _pruning_plan("search", spec, criterion, count, config, auto_device)


def _pruning_plan(
    kind: str,
    spec: PruneSpec | SearchSpec,
    criterion: str,
    num_blocks: int | None,
    config: dict[str, Any],
    auto_device: str,
) -> Plan:
    device = _device_type(spec.device, auto_device)
    dtype = compute_dtype(spec.dtype, device)
    b, out_b = DTYPE_BYTES[dtype], DTYPE_BYTES[source_dtype(config)]
    shape = _Shape(config)
    total, active = total_params(config), active_params(config)
    candidates = removable_blocks(shape.layers, spec.protect_first, spec.protect_last)
    per_block = block_params(config, candidates)
    if num_blocks is not None:
        k = max(0, num_blocks)
    else:
        assert spec.target_ratio is not None
        sizes = layer_param_list(config, active=spec.ratio_of == "active")
        base = active if spec.ratio_of == "active" else total
        counted = [sizes[i] for i in candidates] or sizes
        k = blocks_for_ratio(base, counted, spec.target_ratio, len(candidates) or 1)
    # Expert pruning follows block removal; its counts do not change which blocks go.
    experts = _experts(config, getattr(spec, "expert_pruning", None))
    pruned = with_experts(config, experts[1]) if experts else config
    after, active_after = _after_removal(pruned, candidates, k)
    runtime = RUNTIME_BYTES[device]
    weights = total * b
    plan = Plan(
        kind=kind,
        model_type=str(config.get("model_type")),
        num_layers=shape.layers,
        device=device,
        compute_dtype=dtype,
        output_dtype=source_dtype(config),
        params_before=total,
        params_after=after,
        block_params=per_block,
        weight_bytes=weights,
        output_bytes=after * out_b,
        protected_blocks=sorted(set(range(shape.layers)) - set(candidates)),
        removable_blocks=candidates,
        num_blocks=k,
        active_params_before=active,
        active_params_after=active_after,
        ratio_of=spec.ratio_of,
        experts_before=experts[0] if experts else 0,
        experts_after=experts[1] if experts else 0,
    )
    cast = dtype != source_dtype(config) and device == "cpu"  # on CUDA the map is host memory
    plan.stages.append(_load(runtime, weights, total * out_b, cast))
    calibration = spec.calibration
    tokens = spec.batch_size * (calibration.seq_len if calibration else 0)
    weights_x = WEIGHT_MULTIPLE["scoring"] * weights
    if criterion == "taylor" and calibration is not None:
        loss_batch = spec.taylor_batch_size or calibration.n_samples
        forwards = math.ceil(calibration.n_samples / loss_batch) * math.ceil(
            min(loss_batch, calibration.n_samples) / spec.batch_size
        )
        grads = shape.layers * per_block * b if forwards > 1 else 0
        plan.stages.append(
            _stage(
                "scoring taylor",
                {
                    "runtime": runtime,
                    "weights": WEIGHT_MULTIPLE["taylor"] * weights,
                    "gradients": grads,
                    "activations": shape.backward(tokens, b),
                },
            )
        )
    else:
        plan.stages.append(
            _stage(
                f"scoring {criterion}",
                {"runtime": runtime, "weights": weights_x, "activations": shape.forward(tokens, b)},
            )
        )
    # Saving casts to the source dtype tensor by tensor and writes the shards without a
    # shard-sized copy (measured by bench_scale): the weights in the larger of the two dtypes.
    save = {"runtime": runtime, "weights": WEIGHT_MULTIPLE["save"] * after * max(b, out_b)}
    plan.stages.append(_stage("remove+save", save))
    return plan


def _after_removal(config: dict[str, Any], candidates: list[int], k: int) -> tuple[int, int]:
    """(total, active) parameters of ``config``'s model less ``k`` blocks. Blocks may differ
    (an MoE model's leading dense blocks): a removed block is counted as the mean of the
    removable ones, total and active (exact when the removable blocks are alike)."""
    layers = int(text_config(config)["num_hidden_layers"])
    chosen = candidates or list(range(layers))
    active_sizes = layer_param_list(config, active=True)
    per_block_active = round(sum(active_sizes[i] for i in chosen) / len(chosen))
    return (
        total_params(config) - k * block_params(config, candidates),
        active_params(config) - k * per_block_active,
    )


def _experts(config: dict[str, Any], section: Any) -> tuple[int, int] | None:
    """(experts per MoE block before, after) of a spec's ``expert_pruning`` section; None
    without one, or for a model expert pruning refuses (admission says why)."""
    if section is None:
        return None
    adapter = adapter_for_model_type(config.get("model_type"))
    get = adapter.lookup(text_config(config))
    if adapter.moe is None or expert_pruning_refusal(adapter, get) is not None:
        return None
    total = num_experts(get)
    keep = experts_kept(total, section.keep_experts, section.keep_fraction)
    if expert_keep_problem(total, None, keep) is not None:
        return None
    return total, keep


def _with_text(config: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``changes`` to its language model's fields (a vision-language
    model's ``text_config``, else the file itself)."""
    if isinstance(config.get("text_config"), dict):
        return {**config, "text_config": {**config["text_config"], **changes}}
    return {**config, **changes}


def with_experts(config: dict[str, Any], keep: int) -> dict[str, Any]:
    """``config`` with ``keep`` routed experts per MoE block, in whichever of the expert-count
    fields it spells the count (the family's own when none)."""
    text = text_config(config)
    name = next((n for n in EXPERT_COUNT_FIELDS if isinstance(text.get(n), int)), None)
    if name is None:
        moe = adapter_for_model_type(config.get("model_type")).moe
        assert moe is not None
        name = moe.expert_count
    return _with_text(config, {name: keep})


def config_after(plan: Plan, config: dict[str, Any]) -> dict[str, Any]:
    """The config of the model a planned job produces (fewer blocks after pruning, fewer
    experts after expert pruning; a vision-language model's in its ``text_config``). An MoE
    model's per-layer kinds are not re-derived here: the estimate after pruning uses the
    mean removable block."""
    if plan.experts_after:
        config = with_experts(config, plan.experts_after)
    layers = plan.num_layers - plan.num_blocks
    parent = {PARENT_LAYERS: plan.num_layers}  # the KD teacher of a pipeline's retrain section
    return {**_with_text(config, {"num_hidden_layers": layers}), **parent}


def eval_stages(spec: BaseModel, config: dict[str, Any], auto_device: str) -> list[StagePlan]:
    """The stages of an eval job or pipeline section, after its model is loaded."""
    assert isinstance(spec, EvalSpec)
    device = _device_type(spec.device, auto_device)
    b = DTYPE_BYTES[compute_dtype(spec.dtype, device)]
    shape, total = _Shape(config), total_params(config)
    parts: dict[str, float] = {"runtime": RUNTIME_BYTES[device], "weights": total * b}
    if spec.perplexity is not None:
        tokens = spec.perplexity.batch_size * spec.perplexity.seq_len
        parts["activations"] = shape.forward(tokens, b) + shape.logits(tokens, b)
    if spec.compare_with is not None:
        parts["baseline"] = parts["weights"]  # a second model is loaded for the comparison
    return [_stage("eval", parts)]


def _job_plan(
    kind: str,
    stages: list[StagePlan],
    config: dict[str, Any],
    dtype: str,
    device: str,
    *,
    writes_checkpoint: bool = False,
) -> Plan:
    """A job that keeps the model's blocks; ``writes_checkpoint``: it saves the whole model
    (in the source's precision) as its output."""
    total, active = total_params(config), active_params(config)
    return Plan(
        kind=kind,
        model_type=str(config.get("model_type")),
        num_layers=int(text_config(config)["num_hidden_layers"]),
        device=device,
        compute_dtype=dtype,
        output_dtype=source_dtype(config),
        params_before=total,
        params_after=total,
        block_params=block_params(config),
        weight_bytes=total * DTYPE_BYTES[dtype],
        output_bytes=total * DTYPE_BYTES[source_dtype(config)] if writes_checkpoint else 0,
        stages=stages,
        active_params_before=active,
        active_params_after=active,
    )


def plan_eval(spec: BaseModel, config: dict[str, Any], auto_device: str = "cpu") -> Plan:
    """An eval job: load its model (and the baseline), measure."""
    assert isinstance(spec, EvalSpec)
    return _loaded_plan("eval", spec, config, auto_device, eval_stages)


def _loaded_plan(
    kind: str,
    spec: RetrainSpec | EvalSpec,
    config: dict[str, Any],
    auto_device: str,
    stages_of: Callable[[BaseModel, dict[str, Any], str], list[StagePlan]],
    *,
    writes_checkpoint: bool = False,
) -> Plan:
    stages = [_load_stage(spec.device, spec.dtype, config, auto_device)]
    stages += stages_of(spec, config, auto_device)
    device = _device_type(spec.device, auto_device)
    dtype = compute_dtype(spec.dtype, device)
    return _job_plan(kind, stages, config, dtype, device, writes_checkpoint=writes_checkpoint)


def _load(runtime: int, weights: int, source_bytes: int, cast: bool) -> StagePlan:
    """Loading maps the safetensors files; cast to another dtype, the mapped source pages
    stay resident next to the converted weights until the load ends (file-backed, so
    reclaimable, but counted in the resident size). In the checkpoint's own dtype the
    weights are the mapped pages."""
    parts: dict[str, float] = {"runtime": runtime, "weights": weights}
    if cast:
        parts["mapped source"] = source_bytes
    return _stage("load", parts)


def _load_stage(device: str, dtype: str, config: dict[str, Any], auto_device: str) -> StagePlan:
    device_type = _device_type(device, auto_device)
    total, wanted = total_params(config), compute_dtype(dtype, device_type)
    weights = total * DTYPE_BYTES[wanted]
    source = total * DTYPE_BYTES[source_dtype(config)]
    cast = wanted != source_dtype(config) and device_type == "cpu"
    return _load(RUNTIME_BYTES[device_type], weights, source, cast)


def insufficient_memory(
    plan: Plan, limit_bytes: int, devices: int = 1, needed: int | None = None
) -> str | None:
    """Why the job cannot fit a worker of ``devices`` devices of ``limit_bytes`` each, or
    None when it fits; ``needed``: the devices that would hold it (a retrain spread wider)."""
    over = [
        stage
        for stage in plan.stages
        if stage.peak_bytes > limit_bytes * (1 if stage.per_device else devices)
    ]
    if not over:
        return None
    worst = max(over, key=lambda stage: stage.peak_bytes)
    each = f" per device ({devices} devices)" if devices > 1 else ""
    message = (
        f"insufficient memory: the estimated peak of this job is {worst.peak_bytes / GB:.1f} GB "
        f"({worst.name}, {plan.compute_dtype} on {plan.device}) but the largest worker "
        f"declares {limit_bytes / GB:.1f} GB{each}; use a smaller model, dtype bfloat16, fewer "
        "windows per forward (batch_size) or a larger worker"
    )
    if needed is not None:
        message += (
            f"; the training would fit {needed} devices of this size: distributed "
            f"{{nproc_per_node: {needed}, strategy: fsdp}} on a worker with {needed} devices"
        )
    return message


def render_plan(plan: Plan) -> str:
    """The plan as the CLI prints it."""
    rows = [
        f"model: {plan.model_type}, {plan.num_layers} blocks of {plan.block_params:,} params",
        f"params: {plan.params_before:,} -> {plan.params_after:,} "
        f"(-{100 * (1 - plan.params_after / plan.params_before):.1f}%)",
    ]
    if plan.active_params_before and plan.active_params_before != plan.params_before:
        rows.append(
            f"active params per token: {plan.active_params_before:,} -> "
            f"{plan.active_params_after:,} "
            f"(-{100 * (1 - plan.active_params_after / plan.active_params_before):.1f}%)"
        )
    if plan.experts_after:
        rows.append(
            f"expert pruning: {plan.experts_before} -> {plan.experts_after} routed experts "
            "per MoE block (the calibration text's least routed removed)"
        )
    if plan.num_blocks and plan.ratio_of == "active":
        rows.append("target_ratio counts the active parameters (ratio_of: active)")
    if plan.removable_blocks:
        rows.append(f"remove {plan.num_blocks} of the removable blocks {plan.removable_blocks}")
        rows.append(f"protected blocks: {plan.protected_blocks}")
    if plan.output_bytes:
        rows.append(f"output: {plan.output_bytes / GB:.2f} GB of {plan.output_dtype} weights")
    rows.append(
        f"compute: {plan.compute_dtype} on {plan.device}, weights {plan.weight_bytes / GB:.2f} GB"
    )
    if plan.processes > 1:
        rows.append(f"training: {plan.processes} processes, {plan.strategy} (peaks per device)")
    width = max(len(stage.name) for stage in plan.stages)
    rows.append(f"{'stage'.ljust(width)}  peak GB  formula")
    for stage in plan.stages:
        rows.append(f"{stage.name.ljust(width)}  {stage.peak_bytes / GB:7.2f}  {stage.formula}")
    rows.append(f"peak: {plan.peak_bytes / GB:.2f} GB ({plan.peak_stage})")
    return "\n".join(rows)


def export_stages(spec: BaseModel, config: dict[str, Any], auto_device: str) -> list[StagePlan]:
    """An export job or pipeline section: the unquantized model is measured in fp32 on the
    CPU (the reference perplexity), each artifact is written and loaded next to it, and the
    parent, when given, is measured the same way afterwards (one model at a time besides the
    reference). Quantizing holds a second copy of the weights at most."""
    total = total_params(config)
    weights = total * DTYPE_BYTES["float32"]
    parts: dict[str, float] = {
        "runtime": RUNTIME_BYTES["cpu"],
        "reference": weights,
        "artifact being written or verified": weights,
    }
    if getattr(spec, "perplexity", None) is not None:
        tokens = spec.perplexity.batch_size * spec.perplexity.seq_len  # type: ignore[attr-defined]
        parts["activations"] = _Shape(config).forward(tokens, 4)
    return [_stage("export", parts)]


def plan_export(spec: BaseModel, config: dict[str, Any], auto_device: str = "cpu") -> Plan:
    """An export job: its model is measured and exported on the worker's CPU."""
    stages = [_load_stage("cpu", "float32", config, auto_device)]
    stages += export_stages(spec, config, auto_device)
    return _job_plan("export", stages, config, "float32", "cpu")
