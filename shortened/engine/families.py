"""The model families pruning supports, by ``config.model_type``: where a family keeps its
decoder blocks and final norm, which config fields follow the block count, which blocks are
mixture-of-experts blocks, the shape of a block (for parameter counts from ``config.json``)
and, for a vision-language checkpoint, which Auto class loads it and where its text config is.

Torch-free, so admission can check a checkpoint's ``config.json`` without importing torch;
``architectures.py`` does the block surgery on top of it and ``shortened.param_estimates``
counts parameters from it. The rules of expert pruning live here for the same reason (which
MoE models it refuses, how many experts a spec keeps), read by the engine
(``expert_pruning.py``), admission and the planner alike.

Adding a family: one ``FamilyAdapter(...)`` line in ``FAMILIES`` and one test case (a config
in ``tests/helpers.py::FAMILY_CONFIGS``). A family whose blocks are not interchangeable goes
into ``REFUSED`` with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UnsupportedArchitecture

# Reads one config field: works on a parsed config.json (a dict), a transformers config
# object, or a config with pending changes (see ``architectures._config_changes``).
Lookup = Callable[[str], Any]


def lookup_of(config: Any) -> Lookup:
    if isinstance(config, Mapping):
        return config.get
    return lambda name: getattr(config, name, None)


def _get_path(root: Any, dotted: str) -> Any:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(root: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    setattr(_get_path(root, ".".join(parents)) if parents else root, last, value)


# A shape knob is fixed (True/False) or the name of the config field that switches it.
Flag = bool | str


def flag(value: Flag, get: Lookup) -> bool:
    return bool(get(value)) if isinstance(value, str) else value


@dataclass(frozen=True)
class BlockShape:
    """What a decoder block holds besides the usual q/k/v/o projections and gated MLP, so
    its parameters can be counted from ``config.json`` alone (``shortened.param_estimates``;
    a test compares the count with the instantiated model of every family)."""

    attention: Literal["gqa", "mla"] = "gqa"  # mla: DeepSeek's low-rank latent attention
    qkv_bias: Flag = "attention_bias"
    o_bias: Flag = "attention_bias"
    # q/k norms: "head" one weight of head_dim shared by the heads (Qwen3, Gemma 3), "width"
    # one weight per channel of all heads (OLMo 2, OLMoE, Cohere), on when qk_norm_flag is.
    qk_norm: Literal["none", "head", "width"] = "none"
    qk_norm_flag: Flag = True
    sinks: bool = False  # a learned attention-sink logit per head (gpt-oss)
    mlp_bias: Flag = "mlp_bias"
    # "gated": gate, up and down projections (SwiGLU/GeGLU; fused gate_up counts the same);
    # "plain": up and down only (Falcon, StarCoder2).
    mlp: Literal["gated", "plain"] = "gated"
    norms: int = 2  # hidden-size norms per block
    norm_bias: bool = False  # LayerNorm with a bias (StableLM)
    norm_weight: bool = True  # False: a LayerNorm without parameters (OLMo)
    lm_head_bias: Flag = False  # a bias on the output projection (Phi-3.5-MoE)
    # A block that is not a plain stack of attention then MLP drops this norm (StableLM's
    # parallel residual has no post-attention norm).
    fewer_norms_flag: Flag = False


# The routed-expert count's names across families and transformers versions (a hub
# config.json may spell it differently from the config class's own attribute).
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def num_experts(get: Lookup) -> int:
    for name in EXPERT_COUNT_FIELDS:
        if isinstance(value := get(name), int):
            return value
    return 0


@dataclass(frozen=True)
class MoeLayout:
    """Where a mixture-of-experts family routes and which of its blocks are MoE blocks.

    A dense block stays dense and an MoE block stays MoE after renumbering: the layout is
    recounted (``first_dense``) or turned into the family's explicit per-layer field
    (``sparse_step``: ``decoder_sparse_step`` becomes 1 with ``mlp_only_layers`` listing the
    dense blocks), and the result is checked block by block."""

    expert_size: str = "moe_intermediate_size"  # config field: one expert's intermediate size
    top_k: str = "num_experts_per_tok"
    router: str = "mlp.gate"  # the router module, relative to a block
    router_bias: bool = False
    expert_bias: bool = False  # a bias on each expert's projections (gpt-oss)
    shared_size: str | None = (
        None  # config field: the shared expert's intermediate size (Qwen2-MoE)
    )
    shared_gate: bool = False  # a sigmoid gate (hidden -> 1) on the shared expert
    shared_experts: str | None = None  # config field: shared experts of expert_size (DeepSeek)
    sparse_step: bool = False  # Qwen-MoE: decoder_sparse_step and mlp_only_layers
    first_dense: str | None = None  # config field: leading dense blocks (DeepSeek)
    experts: str = "mlp.experts"  # the routed experts' module, relative to a block
    # The config field holding the routed-expert count, rewritten when experts are pruned.
    expert_count: str = "num_experts"
    # The router selects experts within fixed contiguous groups, with a load-balancing bias
    # on the scores and only the scores returned (DeepSeek-V2/V3, GLM-4.5): removing experts
    # would reshuffle the groups, so expert pruning refuses the family.
    grouped_routing: bool = False


@dataclass(frozen=True)
class FamilyAdapter:
    name: str  # human name used in error messages
    model_types: tuple[str, ...]  # config.model_type values this adapter handles
    layers_path: str = "model.layers"
    final_norm_path: str = "model.norm"
    # Config fields with one entry per decoder layer: sliced to the kept blocks, never re-derived.
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    # Integer config fields that count leading layers (Qwen's max_window_layers): recounted over kept blocks.
    leading_count_fields: tuple[str, ...] = field(default=())
    # Config fields listing absolute layer indices (Qwen-MoE's mlp_only_layers): renumbered.
    index_fields: tuple[str, ...] = field(default=())
    shape: BlockShape = BlockShape()
    moe: MoeLayout | None = None
    # Vision-language checkpoints: the Auto class that loads the whole model and the config
    # key of the language model's config (its blocks are the ones pruned).
    auto_class: str = "AutoModelForCausalLM"
    text_config_key: str | None = None
    # A family whose config.json spells a shape field its own way (Falcon's ffn_hidden_size,
    # its multi_query / num_kv_heads): the usual names' values, derived from its fields, so
    # validation and parameter counts read one vocabulary (see ``lookup``).
    derived_fields: Callable[[Lookup], dict[str, Any]] | None = None
    # LoRA's default targets where this family names its projections otherwise than
    # q/k/v/o_proj and gate/up/down_proj (the spec's default list means "the attention and
    # MLP projections"); None: that list.
    lora_targets: tuple[str, ...] | None = None

    def lookup(self, config: Any) -> Lookup:
        """Reads a field of ``config`` (its text part for a VLM is the caller's to pass),
        with this family's derived fields in the usual names."""
        get = lookup_of(config)
        if self.derived_fields is None:
            return get
        derived = self.derived_fields(get)
        return lambda name: derived[name] if name in derived else get(name)

    @property
    def multimodal(self) -> bool:
        return self.text_config_key is not None

    def layers(self, model: Any) -> Any:
        return _get_path(model, self.layers_path)

    def final_norm(self, model: Any) -> Any:
        return _get_path(model, self.final_norm_path)

    def num_layers(self, model: Any) -> int:
        return len(self.layers(model))

    def text_config(self, config: Any) -> Any:
        """The language model's config (a transformers config or a config.json dict)."""
        if self.text_config_key is None:
            return config
        return lookup_of(config)(self.text_config_key)

    def is_moe_layer(self, get: Lookup, index: int) -> bool:
        """Whether block ``index`` of a text config (read through ``get``) routes to experts."""
        moe = self.moe
        if moe is None or not num_experts(get) > 0:
            return False
        if moe.sparse_step:
            step = get("decoder_sparse_step") or 1
            return index not in (get("mlp_only_layers") or ()) and (index + 1) % step == 0
        if moe.first_dense is not None:
            return index >= (get(moe.first_dense) or 0)
        return True


def _falcon_fields(get: Lookup) -> dict[str, Any]:
    """Falcon's shape in the usual names, as ``FalconDecoderLayer`` builds it: one key/value
    head for multi-query attention (Falcon-7B) unless the new decoder architecture (40B/180B)
    groups them by ``num_kv_heads``; a 4x MLP unless ``ffn_hidden_size`` says otherwise; one
    LayerNorm for a parallel block unless it has two (``num_ln_in_parallel_attn``)."""
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    new_arch = bool(get("new_decoder_architecture"))
    multi_query = get("multi_query") is not False  # FalconConfig's default is True
    kv_heads = get("num_kv_heads") or heads
    lns = get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
    ffn = get("ffn_hidden_size")
    return {
        "num_key_value_heads": 1 if multi_query and not new_arch else kv_heads,
        "intermediate_size": ffn
        if ffn is not None
        else (4 * hidden if isinstance(hidden, int) else None),
        "norms_per_block": 2 if get("parallel_attn") is False or lns == 2 else 1,
    }


_QWEN_MOE = MoeLayout(sparse_step=True)
_DEEPSEEK_MOE = MoeLayout(
    shared_experts="n_shared_experts",
    first_dense="first_k_dense_replace",
    expert_count="n_routed_experts",
    grouped_routing=True,
)

FAMILIES: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("Llama (1/2/3, Vicuna)", ("llama",)),
    FamilyAdapter("Mistral", ("mistral",)),
    FamilyAdapter(
        "Qwen2 / Qwen2.5",
        ("qwen2",),
        leading_count_fields=("max_window_layers",),
        shape=BlockShape(qkv_bias=True, o_bias=False),
    ),
    FamilyAdapter(
        "Qwen3",
        ("qwen3",),
        leading_count_fields=("max_window_layers",),
        shape=BlockShape(qk_norm="head"),
    ),
    FamilyAdapter("Gemma", ("gemma",)),
    FamilyAdapter("Gemma2", ("gemma2",), shape=BlockShape(norms=4)),
    FamilyAdapter("Gemma3 (text)", ("gemma3_text",), shape=BlockShape(qk_norm="head", norms=4)),
    FamilyAdapter("Phi-3 / Phi-4", ("phi3",)),
    FamilyAdapter("OLMo 2", ("olmo2",), shape=BlockShape(qk_norm="width")),
    FamilyAdapter("Granite", ("granite",)),
    FamilyAdapter("SmolLM3", ("smollm3",), per_layer_fields=("layer_types", "no_rope_layers")),
    FamilyAdapter(
        "Cohere (Command R)",
        ("cohere",),
        shape=BlockShape(qk_norm="width", qk_norm_flag="use_qk_norm", norms=1),
    ),
    FamilyAdapter(
        "StableLM",
        ("stablelm",),
        shape=BlockShape(
            qkv_bias="use_qkv_bias",
            o_bias=False,
            mlp_bias=False,
            norm_bias=True,
            fewer_norms_flag="use_parallel_residual",
        ),
    ),
    FamilyAdapter(
        "Mixtral",
        ("mixtral",),
        moe=MoeLayout("intermediate_size", expert_count="num_local_experts"),
    ),
    FamilyAdapter(
        "Qwen2-MoE",
        ("qwen2_moe",),
        index_fields=("mlp_only_layers",),
        shape=BlockShape(qkv_bias=True, o_bias=False),
        moe=MoeLayout(
            shared_size="shared_expert_intermediate_size",
            shared_gate=True,
            sparse_step=True,
        ),
    ),
    FamilyAdapter(
        "Qwen3-MoE",
        ("qwen3_moe",),
        index_fields=("mlp_only_layers",),
        shape=BlockShape(qk_norm="head"),
        moe=_QWEN_MOE,
    ),
    FamilyAdapter(
        "OLMoE",
        ("olmoe",),
        shape=BlockShape(qk_norm="width"),
        moe=MoeLayout("intermediate_size"),
    ),
    FamilyAdapter(
        "DeepSeek-V2 / V3",
        ("deepseek_v2", "deepseek_v3"),
        leading_count_fields=("first_k_dense_replace",),
        shape=BlockShape(attention="mla"),
        moe=_DEEPSEEK_MOE,
    ),
    FamilyAdapter(
        "gpt-oss",
        ("gpt_oss",),
        shape=BlockShape(qkv_bias=True, o_bias=True, sinks=True),
        moe=MoeLayout(
            "intermediate_size",
            router="mlp.router",
            router_bias=True,
            expert_bias=True,
            expert_count="num_local_experts",
        ),
    ),
    FamilyAdapter(
        "Falcon (7B/40B/180B)",
        ("falcon",),
        layers_path="transformer.h",
        final_norm_path="transformer.ln_f",
        shape=BlockShape(
            qkv_bias="bias", o_bias="bias", mlp_bias="bias", mlp="plain", norm_bias=True
        ),
        derived_fields=_falcon_fields,
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
    FamilyAdapter("OLMo", ("olmo",), shape=BlockShape(norms=0, norm_weight=False)),
    FamilyAdapter("OLMo 3", ("olmo3",), shape=BlockShape(qk_norm="width")),
    FamilyAdapter("GLM-4", ("glm4",), shape=BlockShape(o_bias=False, norms=4)),
    FamilyAdapter("Helium", ("helium",)),
    FamilyAdapter("EXAONE 4", ("exaone4",), shape=BlockShape(qk_norm="head")),
    FamilyAdapter(
        "ERNIE 4.5",
        ("ernie4_5",),
        shape=BlockShape(qkv_bias="use_bias", o_bias="use_bias", mlp_bias="use_bias"),
    ),
    FamilyAdapter(
        "StarCoder2",
        ("starcoder2",),
        shape=BlockShape(
            qkv_bias="use_bias",
            o_bias="use_bias",
            mlp_bias="use_bias",
            mlp="plain",
            norm_bias=True,
        ),
    ),
    FamilyAdapter(
        "Granite-MoE",
        ("granitemoe",),
        moe=MoeLayout(
            "intermediate_size",
            router="block_sparse_moe.router",
            experts="block_sparse_moe.experts",
            expert_count="num_local_experts",
        ),
    ),
    FamilyAdapter(
        "Phi-3.5-MoE",
        ("phimoe",),
        shape=BlockShape(norm_bias=True, lm_head_bias="lm_head_bias"),
        moe=MoeLayout("intermediate_size", router="mlp.router", expert_count="num_local_experts"),
    ),
    FamilyAdapter(
        "GLM-4.5 (MoE)",
        ("glm4_moe",),
        leading_count_fields=("first_k_dense_replace",),
        shape=BlockShape(qk_norm="head", qk_norm_flag="use_qk_norm"),
        moe=_DEEPSEEK_MOE,
    ),
    # Vision-language models: the language model's blocks are pruned; the vision tower,
    # projector and processor are kept as they are.
    FamilyAdapter(
        "Gemma 3 (vision-language)",
        ("gemma3",),
        layers_path="model.language_model.layers",
        final_norm_path="model.language_model.norm",
        shape=BlockShape(qk_norm="head", norms=4),
        auto_class="AutoModelForImageTextToText",
        text_config_key="text_config",
    ),
    FamilyAdapter(
        "LLaVA (Llama-based)",
        ("llava",),
        layers_path="model.language_model.layers",
        final_norm_path="model.language_model.norm",
        auto_class="AutoModelForImageTextToText",
        text_config_key="text_config",
    ),
    FamilyAdapter(
        "Idefics3 / SmolVLM",
        ("idefics3", "smolvlm"),
        layers_path="model.text_model.layers",
        final_norm_path="model.text_model.norm",
        auto_class="AutoModelForImageTextToText",
        text_config_key="text_config",
    ),
    FamilyAdapter(
        "Qwen2.5-VL",
        ("qwen2_5_vl",),
        layers_path="model.language_model.layers",
        final_norm_path="model.language_model.norm",
        leading_count_fields=("max_window_layers",),
        shape=BlockShape(qkv_bias=True, o_bias=False),
        auto_class="AutoModelForImageTextToText",
        text_config_key="text_config",
    ),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}

# Families whose blocks are not interchangeable, so removing one would change what the
# others compute: refused with the reason, not with "unknown".
REFUSED: dict[str, str] = {
    **dict.fromkeys(
        ("jamba", "bamba", "zamba", "zamba2", "falcon_h1", "nemotron_h", "granitemoehybrid"),
        "its decoder interleaves attention and state-space (Mamba) blocks of different kinds "
        "whose placement is derived from the absolute layer index",
    ),
    **dict.fromkeys(
        ("gemma3n", "gemma3n_text"),
        "its per-layer input embeddings are one table sized by the layer count and its "
        "KV cache is shared across layers by absolute index",
    ),
    **dict.fromkeys(
        ("llama4", "llama4_text"),
        "its MoE blocks, chunked attention and NoPE layers are placed by the absolute layer "
        "index (interleave steps), which removing a block would shift",
    ),
}


def expert_pruning_refusal(adapter: FamilyAdapter, get: Lookup) -> str | None:
    """Why routing-frequency expert pruning cannot apply to a model of ``adapter``'s family
    whose (text) config ``get`` reads, or None: a dense family or config, no MoE block, or a
    router that selects experts in fixed groups. Admission (a ``config.json``) and the
    engine (the loaded model's config) ask this one function."""
    moe = adapter.moe
    if moe is None:
        return f"expert pruning needs a mixture-of-experts model; {adapter.name} is dense"
    if moe.grouped_routing or get("n_group"):
        return (
            f"expert pruning is not supported for {adapter.name}: its router selects experts "
            "in fixed groups with a load-balancing score bias, which removing experts would "
            "reshuffle"
        )
    layers = get("num_hidden_layers")
    if not isinstance(layers, int) or not any(adapter.is_moe_layer(get, i) for i in range(layers)):
        return (
            f"expert pruning needs mixture-of-experts blocks; this {adapter.name} config has "
            "none (no routed experts, or every block listed as dense)"
        )
    return None


def grouped_routing_families() -> tuple[str, ...]:
    """The families expert pruning refuses because their routers select experts in groups."""
    return tuple(f.name for f in FAMILIES if f.moe is not None and f.moe.grouped_routing)


def experts_kept(total: int, keep_experts: int | None, keep_fraction: float | None) -> int:
    """How many experts each MoE block keeps: ``keep_experts``, or ``keep_fraction`` of the
    ``total`` experts rounded up (at least one)."""
    if keep_experts is not None:
        return keep_experts
    assert keep_fraction is not None
    return max(1, math.ceil(total * keep_fraction))


def expert_keep_problem(total: int, top_k: int | None, keep: int) -> str | None:
    """Why keeping ``keep`` of a block's ``total`` experts is not a pruning (None when it is):
    it must remove one and keep at least the ``top_k`` experts a token is routed to (the
    router's top-k is unchanged). ``top_k`` None: not known, not checked."""
    if keep >= total:
        return f"keeping {keep} of the {total} experts of each block removes none: keep fewer"
    if top_k is not None and keep < top_k:
        return (
            f"keeping {keep} expert{'s' if keep != 1 else ''} is fewer than num_experts_per_tok "
            f"({top_k}), the experts each token is routed to: keep at least {top_k}"
        )
    return None


def supported_families() -> str:
    return ", ".join(family.name for family in FAMILIES)


def adapter_for_model_type(model_type: str | None) -> FamilyAdapter:
    """The adapter for a config's ``model_type``, or ``UnsupportedArchitecture``."""
    family = _BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        raise UnsupportedArchitecture(unsupported_message(model_type))
    return family


def unsupported_message(model_type: str | None) -> str:
    """Why ``model_type`` cannot be pruned (the one message admission and the engine give)."""
    reason = REFUSED.get(model_type or "")
    if reason is not None:
        return f"model type {model_type!r} cannot be depth-pruned: {reason}"
    return f"model type {model_type!r} is not supported; supported families: {supported_families()}"
