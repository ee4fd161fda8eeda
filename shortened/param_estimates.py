"""Parameter counts from ``config.json`` alone (no torch, no weights): per block, for the
whole model, and *active* per token (a mixture-of-experts block runs its router, its shared
experts and only ``num_experts_per_tok`` of its routed experts).

Admission checks a ``target_ratio`` and planning sizes memory with these; a test compares
them with the instantiated model of every supported family (total and active). A block's
shape comes from its family's ``BlockShape`` and ``MoeLayout`` (``shortened.engine.families``);
a vision-language checkpoint counts its language model from ``text_config`` plus its vision
tower and projector (``shortened.vision_estimates``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shortened.engine.families import (
    BlockShape,
    FamilyAdapter,
    Lookup,
    adapter_for_model_type,
    flag,
    num_experts,
)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config of a checkpoint's ``config.json``: the nested
    ``text_config`` of a vision-language model (with the checkpoint's ``model_type``), else
    the file itself."""
    nested = config.get("text_config")
    if isinstance(nested, dict):
        return {**nested, "model_type": config.get("model_type")}
    return config


def _int(get: Lookup, name: str, default: int = 0) -> int:
    value = get(name)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


def _head_dim(get: Lookup) -> int:
    return _int(get, "head_dim") or _int(get, "hidden_size") // _int(get, "num_attention_heads")


def _linear(fan_in: int, fan_out: int, bias: bool) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def _gqa_attention(shape: BlockShape, get: Lookup) -> int:
    hidden, heads = _int(get, "hidden_size"), _int(get, "num_attention_heads")
    kv_heads = _int(get, "num_key_value_heads") or heads
    head_dim = _head_dim(get)
    qkv_bias, o_bias = flag(shape.qkv_bias, get), flag(shape.o_bias, get)
    params = _linear(hidden, heads * head_dim, qkv_bias)
    params += 2 * _linear(hidden, kv_heads * head_dim, qkv_bias)
    params += _linear(heads * head_dim, hidden, o_bias)
    if flag(shape.qk_norm_flag, get):
        if shape.qk_norm == "head":
            params += 2 * head_dim
        elif shape.qk_norm == "width":
            params += (heads + kv_heads) * head_dim
    if shape.sinks:
        params += heads
    return params


def _mla_attention(shape: BlockShape, get: Lookup) -> int:
    """DeepSeek's multi-head latent attention: low-rank queries (or a full q_proj) and a
    compressed key/value latent with a decoupled rotary part."""
    hidden, heads = _int(get, "hidden_size"), _int(get, "num_attention_heads")
    bias = flag(shape.qkv_bias, get)
    q_rank, kv_rank = _int(get, "q_lora_rank"), _int(get, "kv_lora_rank")
    nope, rope, v_dim = (
        _int(get, "qk_nope_head_dim"),
        _int(get, "qk_rope_head_dim"),
        _int(get, "v_head_dim"),
    )
    q_dim = heads * (nope + rope)
    if q_rank:
        params = _linear(hidden, q_rank, bias) + q_rank + q_rank * q_dim
    else:
        params = hidden * q_dim
    params += _linear(hidden, kv_rank + rope, bias) + kv_rank
    params += kv_rank * heads * (nope + v_dim)
    return params + _linear(heads * v_dim, hidden, flag(shape.o_bias, get))


def _gated_mlp(hidden: int, intermediate: int, bias: bool) -> int:
    return 2 * _linear(hidden, intermediate, bias) + _linear(intermediate, hidden, bias)


def _dense_mlp(shape: BlockShape, hidden: int, intermediate: int, bias: bool) -> int:
    if shape.mlp == "plain":
        return _linear(hidden, intermediate, bias) + _linear(intermediate, hidden, bias)
    return _gated_mlp(hidden, intermediate, bias)


def _norm(shape: BlockShape, get: Lookup) -> int:
    """One hidden-size norm's parameters."""
    return _int(get, "hidden_size") * (int(shape.norm_weight) + int(shape.norm_bias))


def _norms(shape: BlockShape, get: Lookup) -> int:
    count = _int(get, "norms_per_block", -1)  # a family's derived count (Falcon)
    if count < 0:
        count = shape.norms - (1 if flag(shape.fewer_norms_flag, get) else 0)
    return count * _norm(shape, get)


def _mlp(adapter: FamilyAdapter, get: Lookup, index: int) -> tuple[int, int]:
    """(total, active) parameters of block ``index``'s feed-forward part."""
    hidden = _int(get, "hidden_size")
    bias = flag(adapter.shape.mlp_bias, get)
    moe = adapter.moe
    if moe is None or not adapter.is_moe_layer(get, index):
        dense = _dense_mlp(adapter.shape, hidden, _int(get, "intermediate_size"), bias)
        return dense, dense
    experts, top_k = num_experts(get), _int(get, moe.top_k, 1)
    size = _int(get, moe.expert_size)
    expert = 3 * hidden * size + ((2 * size + hidden) if moe.expert_bias else 0)
    shared = 0
    if moe.shared_size is not None:
        shared += _gated_mlp(hidden, _int(get, moe.shared_size), False)
    if moe.shared_experts is not None:
        shared += _gated_mlp(hidden, size * _int(get, moe.shared_experts), False)
    if moe.shared_gate:
        shared += hidden
    fixed = _linear(hidden, experts, moe.router_bias) + shared
    return fixed + experts * expert, fixed + min(top_k, experts) * expert


def layer_params(config: dict[str, Any], index: int) -> tuple[int, int]:
    """(total, active) parameters of decoder block ``index`` of a checkpoint's config.json."""
    adapter = adapter_for_model_type(config.get("model_type"))
    get = adapter.lookup(text_config(config))
    shape = adapter.shape
    attention = (
        _mla_attention(shape, get) if shape.attention == "mla" else _gqa_attention(shape, get)
    )
    mlp_total, mlp_active = _mlp(adapter, get, index)
    rest = attention + _norms(shape, get)
    return rest + mlp_total, rest + mlp_active


def layer_param_list(config: dict[str, Any], active: bool = False) -> list[int]:
    """Every decoder block's parameters (``active``: per token), in block order."""
    layers = int(text_config(config)["num_hidden_layers"])
    return [layer_params(config, i)[1 if active else 0] for i in range(layers)]


def block_params(config: dict[str, Any], blocks: Sequence[int] | None = None) -> int:
    """Parameters of one decoder block: the mean over ``blocks`` (default all), rounded; the
    exact count when every block has the same shape (a dense family)."""
    sizes = layer_param_list(config)
    chosen = [sizes[i] for i in blocks] if blocks else sizes
    return round(sum(chosen) / len(chosen))


def _outside_blocks(config: dict[str, Any]) -> int:
    """Embeddings, LM head (unless tied), final norm, and a multimodal checkpoint's vision
    tower and projector."""
    adapter = adapter_for_model_type(config.get("model_type"))
    text = text_config(config)
    get = adapter.lookup(text)
    hidden, vocab = _int(get, "hidden_size"), _int(get, "vocab_size")
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    params = vocab * hidden * (1 if tied else 2)
    params += _norm(adapter.shape, get)
    if flag(adapter.shape.lm_head_bias, get):
        params += vocab
    if adapter.multimodal:
        from shortened.vision_estimates import vision_params

        params += vision_params(config)
    return params


def total_params(config: dict[str, Any]) -> int:
    """Every parameter of the checkpoint, counted once (tied embeddings once)."""
    return _outside_blocks(config) + sum(layer_param_list(config))


def active_params(config: dict[str, Any]) -> int:
    """Parameters used per token: as ``total_params`` with each MoE block's routed experts
    counted ``num_experts_per_tok`` times instead of ``num_experts`` (dense models: equal)."""
    return _outside_blocks(config) + sum(layer_param_list(config, active=True))


def block_share(config: dict[str, Any], blocks: Sequence[int], ratio_of: str = "total") -> float:
    """The mean fraction of the parameters (``ratio_of`` "total", or "active" per token)
    one of ``blocks`` holds: what removing one of them removes."""
    active = ratio_of == "active"
    sizes = layer_param_list(config, active=active)
    whole = active_params(config) if active else total_params(config)
    return sum(sizes[i] for i in blocks) / len(blocks) / whole
