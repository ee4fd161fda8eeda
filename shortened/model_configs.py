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
* the file is at most 1 MiB (real configs are a few kB) and nested at most 32 levels;
* every number in it is finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

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


def config_problems(config: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, message)`` for every dimension that is missing, not a positive integer or
    past its bound; empty when the config's numbers can be used."""
    found: list[tuple[str, str]] = []
    for name, (bound, required) in DIMENSIONS.items():
        value = config.get(name)
        if value is None:
            if required:
                found.append((name, f"config.json has no {name}"))
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            found.append((name, f"config.json: {name} must be an integer, got {value!r:.40}"))
        elif not 1 <= value <= bound:
            found.append(
                (name, f"config.json: {name} must be between 1 and {bound:,}, got {value:,}")
            )
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
