"""How one training stage is spread over the ranks of a ``torchrun`` launch (``launch.py``):
the Trainer's arguments for FSDP2 or DDP (accelerate does the wrapping, sharded checkpoints
and resume), FSDP on CPU ranks, the KD teacher sharded like the student, and the trained
model gathered back into one plain module on rank 0 (what the quality gate measures and
``write_outputs`` saves).

Under ``fsdp`` the student's weights, gradients and AdamW states are sharded over the ranks
(one FSDP unit per decoder block, plus the root for the embeddings, final norm and head);
the frozen KD teacher is sharded the same way (its weights only: it has no gradients or
optimizer states), so a teacher that does not fit one device still runs. Under ``ddp`` every
rank holds both whole models and the gradients are all-reduced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import RetrainSpec

from .checkpoints import is_main_process, is_sharded, world_size

if TYPE_CHECKING:
    from .run import RetrainRun


def block_classes(model: Any) -> list[str]:
    """The decoder block classes FSDP wraps one unit each: transformers' own list of modules
    that must not be split (``_no_split_modules``), found through a peft wrapper too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = getattr(base, "_no_split_modules", None) or []
    present = {type(module).__name__ for module in base.modules()}
    return sorted(name for name in names if name in present)


def parallel_arguments(spec: RetrainSpec, model: Any, device: torch.device) -> dict[str, Any]:
    """TrainingArguments for this launch's strategy: nothing on one rank; DDP without the
    unused-parameter search (every trainable weight gets a gradient); FSDP2 with one unit
    per decoder block and sharded checkpoints (every rank writes its own shard, and resumes
    from it, whatever the model's size)."""
    if world_size() == 1:
        return {}
    if spec.distributed.strategy == "ddp":
        return {
            "ddp_find_unused_parameters": False,
            "ddp_backend": "gloo" if device.type == "cpu" else None,
        }
    wrap: dict[str, Any] = (
        {"auto_wrap_policy": "NO_WRAP"}  # KD: sharded by shard_for_kd before prepare
        if spec.method == "kd"
        else {
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": block_classes(model),
        }
    )
    return {
        "fsdp": True,
        "fsdp_config": {
            "fsdp_version": 2,
            **wrap,
            "reshard_after_forward": True,
            "state_dict_type": "SHARDED_STATE_DICT",
        },
    }


def prepare_parallel(trainer: Any, spec: RetrainSpec, teacher: Any = None) -> None:
    """What the Trainer does not do by itself: FSDP on CPU ranks, and for KD both models
    sharded here (see :func:`shard_for_kd`)."""
    if not is_sharded(spec):
        return
    _fsdp_on_cpu(trainer)
    if teacher is not None:
        shard_for_kd(trainer.model, teacher)


def _fsdp_on_cpu(trainer: Any) -> None:
    """accelerate turns FSDP on for accelerator ranks only and trains CPU ranks as plain
    data-parallel; FSDP2 itself shards over gloo as well. Switching the state over before
    the first ``prepare`` (Trainer prepares the model in ``train``) makes a CPU worker, and
    the CPU tests, run the same sharded path as GPUs do."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or trainer.args.fsdp_plugin_args is None:
        return
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def shard_for_kd(student: Any, teacher: Any) -> None:
    """FSDP2 over the KD student and its frozen teacher: one unit per decoder block, then
    the root, each model on its own. accelerate would carve the final norm and the head into
    a unit of their own, freed after its backward; the KD loss applies the head again, to
    the final hidden states a chunk at a time (``distillation.py``), so a separate unit
    would be read after it was freed. In the root unit (gathered for the whole step) the
    head is there for the loss as for the forward; accelerate leaves a model already sharded
    as it is and does the rest (optimizer, sharded checkpoints, resume)."""
    for model in (student, teacher):
        _shard(model, block_classes(model))


def _shard(model: Any, classes: list[str]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (world_size(),))
    for module in model.modules():
        if type(module).__name__ in classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)


def gather_trained(model: Any) -> Any:
    """The trained model as one plain (unsharded) module on rank 0, its weights on the CPU
    (every rank takes part in the gathering; the other ranks get None). For a peft model,
    a peft model with the same adapter. Unsharded models are returned as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not _is_fsdp(model):
        return model
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not is_main_process():
        return None
    return _plain_copy(model, full)


def _is_fsdp(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def _plain_copy(sharded: Any, full: dict[str, Any]) -> Any:
    """A module of the sharded one's architecture (and adapter) holding ``full``: built on
    the meta device (no second initialisation of every weight), the gathered tensors
    assigned, the buffers FSDP leaves unsharded (rotary frequencies) copied, ties restored."""
    from transformers import AutoModelForCausalLM

    peft_config = getattr(sharded, "peft_config", None)
    base = sharded.get_base_model() if peft_config else sharded
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(base.config)
        if peft_config:
            from peft import get_peft_model

            plain = get_peft_model(plain, peft_config["default"])
    plain.load_state_dict(full, assign=True, strict=True)
    buffers = dict(sharded.named_buffers())
    for name, _ in list(plain.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        module = plain.get_submodule(owner) if owner else plain
        module._buffers[leaf] = buffers[name].detach().to("cpu").clone()
    (plain.get_base_model() if peft_config else plain).tie_weights()
    plain.train(sharded.training)
    trainable = {name: param.requires_grad for name, param in sharded.named_parameters()}
    for name, param in plain.named_parameters():
        param.requires_grad_(trainable.get(name, False))
    base_plain = plain.get_base_model() if peft_config else plain
    base_plain.generation_config = base.generation_config  # saved with the model
    return plain


def unshard_run(run: RetrainRun, trained: Any) -> None:
    """After a sharded stage, rank 0's run holds the trained model as one plain module (the
    other ranks keep their shards: only rank 0 measures and saves it)."""
    if not is_sharded(run.spec):
        return
    plain = gather_trained(trained)
    if plain is None:
        return
    if trained is run.peft_model:
        run.peft_model, run.model = plain, plain.get_base_model()
    else:
        run.model = plain


def share_cpt_model(run: RetrainRun) -> None:
    """cpt_lora under FSDP: after the CPT stage only rank 0 holds the whole trained model,
    and it has saved it (``cpt/final``, the adapter's base); the other ranks wait for that
    and load it from there, so every rank starts the LoRA stage from the same weights."""
    if not is_sharded(run.spec) or run.cpt_already_done:
        return
    import torch.distributed as dist

    from ..models import load_model

    dist.barrier()
    if is_main_process():
        return
    assert run.cpt_done_dir is not None  # a launch always has a checkpoint directory
    dtype = str(run.precision.weights).removeprefix("torch.")
    run.model = load_model(str(run.cpt_done_dir), dtype=dtype, device=str(run.load_device)).model
