"""Command-line options declared from the spec models, so that a default, a set of choices or
a description is written once (in ``shortened/specs.py``) and the CLI cannot drift from it.

An option made here defaults to ``None``: a command passes only the options the user gave
(``given``), and the spec model applies its own defaults to the rest. The help text still
shows the spec's default.
"""

from __future__ import annotations

import argparse
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

_SCALAR_TYPES = (int, float, str)


def _without_none(annotation: Any) -> Any:
    """``X`` of ``X | None`` (``Optional[X]``); anything else as is."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def literal_choices(annotation: Any) -> list[Any] | None:
    """The values of a ``Literal[...]`` field (optional or not); None for other types."""
    annotation = _without_none(annotation)
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return None


def spec_default(model: type[BaseModel], field: str) -> Any:
    """The value the spec model gives ``field`` when it is not given."""
    return model.model_fields[field].get_default(call_default_factory=True)


def spec_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    field: str,
    *flags: str,
    help: str | None = None,  # noqa: A002 - argparse's own keyword
    **kwargs: Any,
) -> argparse.Action:
    """``parser.add_argument(*flags)`` for ``model.field``: its type, choices, description and
    default (shown in the help, not set: the option is ``None`` unless given). ``flags``
    defaults to ``--<field with dashes>``; ``help`` adds CLI-only wording before the spec's.
    A ``bool`` field becomes a flag that sets ``True``."""
    info = model.model_fields[field]
    annotation = _without_none(info.annotation)
    choices = literal_choices(annotation)
    if choices is not None:
        kwargs.setdefault("choices", choices)
    elif annotation is bool:
        kwargs.setdefault("action", "store_true")
    elif annotation in _SCALAR_TYPES and annotation is not str:
        kwargs.setdefault("type", annotation)
    default = spec_default(model, field)
    text = " ".join(part for part in (help, info.description) if part)
    if default is not None and annotation is not bool:
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return parser.add_argument(
        *(flags or (f"--{field.replace('_', '-')}",)),
        dest=kwargs.pop("dest", None) or _dest(flags, field),
        default=None,
        help=text.replace("%", "%%") or None,
        **kwargs,
    )


def _dest(flags: tuple[str, ...], field: str) -> str:
    long = next((flag for flag in flags if flag.startswith("--")), None)
    return long[2:].replace("-", "_") if long else field


def given(**values: Any) -> dict[str, Any]:
    """Only the options the user gave, so the spec's own defaults apply to the rest."""
    return {key: value for key, value in values.items() if value is not None}
