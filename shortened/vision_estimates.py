"""Parameter counts of a vision-language checkpoint's vision tower and projector, from
``config.json`` alone (no torch): what ``shortened.param_estimates`` adds to the language
model's count. Pruning never touches these parameters; they count toward the checkpoint's
size, its memory plan and the share of the parameters a block holds.

Towers: ViT-style encoders with LayerNorms and biased projections (SigLIP, as in Gemma 3,
Idefics3 / SmolVLM and SigLIP-based LLaVA; CLIP, with its class token and pre-norm) and
Qwen2.5-VL's windowed encoder with its patch merger. A test compares every count with the
instantiated model.
"""

from __future__ import annotations

from typing import Any

_SIGLIP_TYPES = ("siglip_vision_model", "idefics3_vision", "smolvlm_vision")


def _vit_layer(dim: int, intermediate: int) -> int:
    """Two biased LayerNorms, q/k/v/out with biases, a two-layer MLP with biases."""
    return 4 * dim + 4 * (dim * dim + dim) + 2 * dim * intermediate + intermediate + dim


def _vit(vision: dict[str, Any], clip: bool) -> int:
    dim, intermediate = int(vision["hidden_size"]), int(vision["intermediate_size"])
    patch, channels = int(vision["patch_size"]), int(vision.get("num_channels", 3))
    positions = (int(vision["image_size"]) // patch) ** 2 + (1 if clip else 0)
    params = channels * patch * patch * dim + positions * dim
    params += 3 * dim if clip else dim  # CLIP: class token and pre-norm; SigLIP: patch bias
    params += int(vision["num_hidden_layers"]) * _vit_layer(dim, intermediate)
    params += 2 * dim  # post-norm
    if not clip and vision.get("model_type") == "siglip_vision_model":
        if vision.get("vision_use_head", True):  # attention-pooling head
            params += dim + 3 * (dim * dim + dim) + (dim * dim + dim) + 2 * dim
            params += 2 * dim * intermediate + intermediate + dim
    return params


def _qwen2_5_vl(vision: dict[str, Any]) -> int:
    dim, intermediate = int(vision["hidden_size"]), int(vision["intermediate_size"])
    patch, temporal = int(vision["patch_size"]), int(vision["temporal_patch_size"])
    channels = int(vision.get("in_channels", 3))
    merged = dim * int(vision["spatial_merge_size"]) ** 2
    block = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim)
    block += 3 * dim * intermediate + 2 * intermediate + dim  # gated MLP with biases
    params = channels * temporal * patch * patch * dim + int(vision["depth"]) * block
    out = int(vision["out_hidden_size"])
    return params + dim + merged * merged + merged + merged * out + out


def _projector(config: dict[str, Any], vision_dim: int, text_dim: int) -> int:
    model_type = config.get("model_type")
    if model_type == "gemma3":
        return vision_dim * text_dim + vision_dim  # projection and soft-embedding norm
    if model_type == "llava":
        bias = bool(config.get("multimodal_projector_bias", True))
        layers = config.get("vision_feature_layer", -1)
        fan_in = vision_dim * (len(layers) if isinstance(layers, list) else 1)
        return fan_in * text_dim + text_dim * text_dim + (2 * text_dim if bias else 0)
    if model_type in ("idefics3", "smolvlm"):
        return vision_dim * int(config.get("scale_factor", 2)) ** 2 * text_dim
    return 0  # Qwen2.5-VL: the merger is part of its vision tower


def vision_params(config: dict[str, Any]) -> int:
    """The vision tower's and projector's parameters of a vision-language ``config.json``.
    Raises ``KeyError`` for a vision tower it does not know."""
    vision, text = config["vision_config"], config["text_config"]
    if config.get("model_type") == "qwen2_5_vl":
        return _qwen2_5_vl(vision)
    vision_type = vision.get("model_type")
    if vision_type not in (*_SIGLIP_TYPES, "clip_vision_model"):
        raise KeyError(f"no parameter estimate for vision tower {vision_type!r}")
    tower = _vit(vision, clip=vision_type == "clip_vision_model")
    return tower + _projector(config, int(vision["hidden_size"]), int(text["hidden_size"]))
