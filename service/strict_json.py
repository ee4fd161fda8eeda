"""Numbers a JSON request body may hold: finite, and integers within 64 bits.

Python's ``json`` reads ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON at all), turns
``1e400`` into infinity and reads integers of any size. None of them is a valid value of any
field, neither JSON responses nor PostgreSQL's jsonb can hold the non-finite ones, and they
used to reach the validation error's echo of the input, which then failed to encode (500).
So every JSON body is checked once, before any route sees it, and such a number is a 422
naming where it is, like FastAPI's own field errors.
"""

from __future__ import annotations

import json
import math
from typing import Any

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Longer integer literals are not even converted (int() of a huge literal is quadratic and
# Python refuses beyond 4300 digits); 20 digits hold every 64-bit integer.
_MAX_INT_DIGITS = 20


class _HugeInt:
    """An integer literal too long to convert, kept only to report where it is."""


_HUGE = _HugeInt()


def _parse_int(literal: str) -> int | _HugeInt:
    return _HUGE if len(literal.lstrip("-")) > _MAX_INT_DIGITS else int(literal)


def is_json_content(content_type: str | None) -> bool:
    """Whether FastAPI reads a body with this Content-Type as JSON (as it does: no type,
    application/json or any +json type)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def _problem(value: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number: NaN, Infinity and numbers beyond 1.8e308 are refused"
    if isinstance(value, _HugeInt) or (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not INT64_MIN <= value <= INT64_MAX
    ):
        return "integer out of range: at most 64 bits"
    return None


def number_errors(body: bytes) -> list[dict[str, Any]]:
    """FastAPI-style errors (``loc``, ``msg``, ``type``) for every non-finite or out-of-range
    number in a JSON ``body``; [] when there is none or the body is not JSON (FastAPI
    reports that itself)."""
    try:
        document = json.loads(body, parse_int=_parse_int)
    except (ValueError, RecursionError):
        return []
    errors: list[dict[str, Any]] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [(("body",), document)]
    while stack:  # iterative: a deeply nested body must not exhaust the Python stack
        loc, value = stack.pop()
        if isinstance(value, dict):
            stack.extend(((*loc, key), child) for key, child in value.items())
        elif isinstance(value, list):
            stack.extend(((*loc, index), child) for index, child in enumerate(value))
        elif (message := _problem(value)) is not None:
            errors.append({"loc": list(loc), "msg": message, "type": "number_out_of_range"})
    errors.sort(key=lambda error: [str(part) for part in error["loc"]])
    return errors
