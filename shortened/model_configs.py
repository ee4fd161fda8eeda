"""A model's ``config.json``, validated before anything trusts its numbers.

One mechanism for every reader: admission and dry-run planning (API and CLI), the worker's
memory check and the engine's model loading all parse the file with :func:`parse_config`
and check its numbers with :func:`config_problems`. A hostile or absurd file (huge, deeply
nested, non-finite, zero, negative, fractional or astronomically large dimensions) is
refused with the field it names before it can cost CPU or produce a nonsense plan.

Bounds (inclusive), each well past any released model, so no real checkpoint is refused:

* ``num_hidden_layers`` <= ``MAX_BLOCKS`` (1024; the deepest released LLMs have ~200);
* ``hidden_size`` and ``head_dim`` * heads <= 2**17 (131,072; the widest are ~25,600);
* ``intermediate_size`` <= 2**20 (the widest MLPs are ~100,000);
* attention heads <= 2**12, key/value heads <= the attention heads;
* ``vocab_size`` <= 2**22 (4.2 M; the largest vocabularies are ~262,000);
* ``max_position_embeddings`` <= 2**24;
* mixture of experts: routed experts <= 2**14 (the most released are 384), experts per
  token <= the experts, an expert's intermediate size <= 2**20, leading dense blocks
  (``first_k_dense_replace``) and ``decoder_sparse_step`` <= ``MAX_BLOCKS``;
* the file is at most 1 MiB (real configs are a few kB) and nested at most 32 levels;
* every number in it is finite.

A vision-language checkpoint's numbers are its language model's, read from the nested
``text_config`` (the vision tower's config is not pruned and its numbers are not used). A
family that spells a field its own way (Falcon's ``ffn_hidden_size`` and ``num_kv_heads``)
is read through its adapter's derived fields, so the usual names are checked for it too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from shortened.engine.errors import UnsupportedArchitecture
from shortened.engine.families import Lookup, adapter_for_model_type, lookup_of
from shortened.specs import MAX_BLOCKS

MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32

# field: (upper bound, required). Dimensions are positive integers (booleans are not).
DIMENSIONS: dict[str, tuple[int, bool]] = {
    "num_hidden_layers": (MAX_BLOCKS, True),
    "hidden_size": (1 << 17, True),
    "intermediate_size": (1 << 20, True),
    "num_attention_heads": (1 << 12, True),
    "vocab_size": (1 << 22, True),
    "num_key_value_heads": (1 << 12, False),
    "head_dim": (1 << 14, False),
    "max_position_embeddings": (1 << 24, False),
    "num_experts_per_tok": (1 << 14, False),
    "moe_intermediate_size": (1 << 20, False),
    "shared_expert_intermediate_size": (1 << 20, False),
    "decoder_sparse_step": (MAX_BLOCKS, False),
    # Falcon's own names (its adapter derives intermediate_size and the key/value heads).
    "ffn_hidden_size": (1 << 20, False),
    "num_kv_heads": (1 << 12, False),
}
# Counts that may be 0 (a Qwen2-MoE config with no experts is dense; no leading dense
# blocks; no shared experts): non-negative integers up to the bound.
COUNTS: dict[str, int] = {
    "num_experts": 1 << 14,
    "num_local_experts": 1 << 14,
    "n_routed_experts": 1 << 14,
    "n_shared_experts": 1 << 10,
    "first_k_dense_replace": MAX_BLOCKS,
}


class ConfigError(ValueError):
    """``config.json`` cannot be used; ``field`` is the key it names (None: the file)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _reject_constant(name: str) -> float:
    raise ConfigError(f"config.json has a non-finite number ({name})")


def parse_config(data: bytes | str) -> dict[str, Any]:
    """The JSON object in ``data``: at most ``MAX_CONFIG_BYTES``, nested at most
    ``MAX_CONFIG_DEPTH`` levels, every number finite. Raises ``ConfigError``."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config.json is {size:,} bytes; at most {MAX_CONFIG_BYTES:,}")
    try:
        config = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise ConfigError(f"config.json is nested more than {MAX_CONFIG_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"config.json is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise ConfigError("config.json is not a JSON object")
    for depth, value in _walk(config):
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"config.json is nested more than {MAX_CONFIG_DEPTH} levels")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError("config.json has a non-finite number")  # 1e999 parses as inf
    return config


def _walk(value: Any) -> Iterator[tuple[int, Any]]:
    """Every value with its depth, iteratively (a hostile file never exhausts the stack)."""
    stack = [(1, value)]
    while stack:
        depth, item = stack.pop()
        yield depth, item
        if depth > MAX_CONFIG_DEPTH:
            continue
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        stack.extend((depth + 1, child) for child in children)


def language_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of ``config.json`` that describes the decoder: a vision-language
    checkpoint's ``text_config``, else the file itself."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def _family_lookup(config: dict[str, Any], language: dict[str, Any]) -> Lookup:
    """Reads ``language`` with the derived fields of the checkpoint's family (plain reads
    for a type no adapter knows: admission refuses it with its own message)."""
    try:
        return adapter_for_model_type(config.get("model_type")).lookup(language)
    except UnsupportedArchitecture:
        return lookup_of(language)


def _bound_problem(name: str, value: Any, low: int, bound: int) -> tuple[str, str] | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return (name, f"config.json: {name} must be an integer, got {value!r:.40}")
    if not low <= value <= bound:
        return (name, f"config.json: {name} must be between {low} and {bound:,}, got {value:,}")
    return None


def config_problems(config: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, message)`` for every dimension that is missing, not a positive integer or
    past its bound; empty when the config's numbers can be used. A vision-language
    checkpoint's fields are its ``text_config``'s (named ``text_config.<field>``)."""
    prefix = "text_config." if config.get("text_config") is not None else ""
    if prefix and not isinstance(config["text_config"], dict):
        return [("text_config", "config.json: text_config must be an object")]
    raw = language_config(config)
    get = _family_lookup(config, raw)
    config = raw | {
        name: value for name in (*DIMENSIONS, *COUNTS) if (value := get(name)) is not None
    }
    found: list[tuple[str, str]] = []
    for name, (bound, required) in DIMENSIONS.items():
        value = config.get(name)
        if value is None:
            if required:
                found.append((name, f"config.json has no {prefix}{name}"))
            continue
        if problem := _bound_problem(name, value, 1, bound):
            found.append(problem)
    for name, bound in COUNTS.items():
        value = config.get(name)
        if value is not None and (problem := _bound_problem(name, value, 0, bound)):
            found.append(problem)
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if not found and kv_heads is not None and kv_heads > heads:
        found.append(
            (
                "num_key_value_heads",
                f"config.json: num_key_value_heads ({kv_heads}) exceeds num_attention_heads ({heads})",
            )
        )
    if not found and config.get("head_dim") is None and config["hidden_size"] % heads:
        found.append(
            (
                "hidden_size",
                f"config.json: hidden_size ({config['hidden_size']}) is not a multiple of num_attention_heads ({heads})",
            )
        )
    experts = next(
        (
            config[n]
            for n in ("num_experts", "num_local_experts", "n_routed_experts")
            if config.get(n) is not None
        ),
        None,
    )
    top_k = config.get("num_experts_per_tok")
    if not found and experts and top_k is not None and top_k > experts:
        found.append(
            (
                "num_experts_per_tok",
                f"config.json: num_experts_per_tok ({top_k}) exceeds the experts ({experts})",
            )
        )
    width = (config.get("head_dim") or 0) * (heads if isinstance(heads, int) else 0)
    if not found and width > 1 << 17:
        found.append(
            (
                "head_dim",
                f"config.json: head_dim x num_attention_heads is {width:,}; at most {1 << 17:,}",
            )
        )
    return found


def check_config(config: dict[str, Any]) -> None:
    """Raise ``ConfigError`` for the first problem of :func:`config_problems`."""
    if found := config_problems(config):
        field, message = found[0]
        raise ConfigError(message, field)
