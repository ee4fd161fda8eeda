"""JSON-safe copies of values bound for jsonb columns and JSON responses."""

from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any) -> Any:
    """A JSON-compatible copy: non-finite floats (an infinite perplexity) become None,
    since neither strict JSON responses nor PostgreSQL's jsonb accept them; other
    non-JSON values (paths, ...) become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
