"""Command-line options declared once, as rows of a table per command, from which both the
argparse parser and the spec the command runs are made: a row names the spec field it fills
(``"calibration.n_samples"``), and the field's annotation and description in
``shortened/specs`` give the option's type, choices, help and shown default, so the CLI
cannot drift from the spec.

An option made here defaults to ``None``: ``spec_values`` passes only the options the user
gave, and the spec model applies its own defaults to the rest (the help text still shows the
spec's default). Rows of other kinds declare a flag that sets fixed spec values
(``Switch``), an option of the run that is not in the spec (``Flag``), and a group of rows
(``Group``: a titled help section or a mutually exclusive set).
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

_SCALAR_TYPES = (int, float)
_LIST_NOUNS = {int: "integers", float: "numbers"}


@dataclass(frozen=True)
class SpecOption:
    """An option filling the spec field at ``path`` (dot-separated, under the command's spec
    model, or under ``model`` when given). ``flag`` defaults to ``--<field with dashes>``;
    ``help`` adds CLI-only wording before the field's description; ``also`` names other paths
    that receive the same value; ``implies`` holds values set with it; ``keywords`` holds
    extra ``add_argument`` keywords (``type``, ``metavar``, ``action``, ``required``)."""

    path: str
    flag: str | None = None
    help: str | None = None
    model: type[BaseModel] | None = None
    also: tuple[str, ...] = ()
    implies: Mapping[str, Any] = field(default_factory=dict)
    keywords: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.long_flag[2:].replace("-", "_")

    @property
    def long_flag(self) -> str:
        return self.flag or "--" + self.path.rsplit(".", 1)[-1].replace("_", "-")


@dataclass(frozen=True)
class Switch:
    """A flag without a value that sets fixed spec values (``--no-protect``)."""

    flag: str
    sets: Mapping[str, Any]
    help: str

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


@dataclass(frozen=True)
class Flag:
    """An option of the run itself, not of the spec (``--output``, ``--dry-run``)."""

    flags: tuple[str, ...]
    keywords: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Group:
    """Rows shown under a title in the help, or (``exclusive``) of which at most one (with
    ``required``: exactly one) may be given."""

    title: str | None
    rows: tuple[Row, ...]
    exclusive: bool = False
    required: bool = False


Row = SpecOption | Switch | Flag | Group


def _bare(annotation: Any) -> Any:
    """``X`` of ``X | None`` and of ``Annotated[X, ...]``; anything else as is."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def literal_choices(annotation: Any) -> list[Any] | None:
    """The values of a ``Literal[...]`` field (optional or not); None for other types."""
    annotation = _bare(annotation)
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return None


def spec_default(model: type[BaseModel], name: str) -> Any:
    """The value the spec model gives field ``name`` when it is not given (None for a
    required field: there is none)."""
    info = model.model_fields[name]
    if info.is_required():
        return None
    return info.get_default(call_default_factory=True)


def field_model(root: type[BaseModel], option: SpecOption) -> tuple[type[BaseModel], str]:
    """The model owning the field ``option`` fills, and the field's name."""
    *sections, name = option.path.split(".")
    if option.model is not None:
        return option.model, name
    model = root
    for section in sections:
        model = _bare(model.model_fields[section].annotation)
    return model, name


def comma_separated(name: str, item: Any) -> Callable[[str], list[Any]]:
    """An argparse ``type`` reading a comma-separated list of ``item`` values (ints, floats,
    strings or the values of a ``Literal``) into field ``name``."""
    choices = literal_choices(item)
    convert = item if item in _SCALAR_TYPES else str

    def parse(value: str) -> list[Any]:
        parts = [part.strip() for part in value.split(",") if part.strip()]
        try:
            values = [convert(part) for part in parts]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {_LIST_NOUNS[item]}, got {value!r}"
            ) from exc
        unknown = [v for v in values if choices is not None and v not in choices]
        if unknown or (choices is not None and not values):
            raise argparse.ArgumentTypeError(
                f"unknown {name} {unknown or value!r}; choose from {', '.join(map(str, choices or ()))}"
            )
        return values

    return parse


def _value_keywords(name: str, annotation: Any) -> dict[str, Any]:
    """How argparse reads a value of ``annotation``: choices, a flag, a type, or a list."""
    annotation = _bare(annotation)
    choices = literal_choices(annotation)
    if choices is not None:
        return {"choices": choices}
    if annotation is bool:
        return {"action": "store_true"}
    if annotation in _SCALAR_TYPES:
        return {"type": annotation}
    if get_origin(annotation) is list:
        return {"type": comma_separated(name, _bare(get_args(annotation)[0]))}
    return {}


def _help(model: type[BaseModel], name: str, prefix: str | None, is_flag: bool) -> str | None:
    info = model.model_fields[name]
    text = " ".join(part for part in (prefix, info.description) if part)
    default = spec_default(model, name)
    if default is not None and not is_flag:
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return text.replace("%", "%%") or None


def add_spec_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    root: type[BaseModel],
    option: SpecOption,
) -> argparse.Action:
    """``parser.add_argument`` for ``option``: the field's type, choices, description and
    default (shown in the help, not set: the option is ``None`` unless given). A ``bool``
    field becomes a flag that sets ``True``; a list field reads comma-separated values."""
    model, name = field_model(root, option)
    keywords = {**_value_keywords(name, model.model_fields[name].annotation), **option.keywords}
    is_flag = keywords.get("action") == "store_true"
    return parser.add_argument(
        option.long_flag,
        dest=option.dest,
        default=None,
        help=_help(model, name, option.help, is_flag),
        **keywords,
    )


def add_rows(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    root: type[BaseModel],
    rows: Sequence[Row],
) -> None:
    """Declare every row of a command's table on its parser."""
    for row in rows:
        if isinstance(row, SpecOption):
            add_spec_option(parser, root, row)
        elif isinstance(row, Switch):
            parser.add_argument(row.flag, dest=row.dest, action="store_true", help=row.help)
        elif isinstance(row, Flag):
            parser.add_argument(*row.flags, **row.keywords)
        else:
            add_rows(_group(parser, row), root, row.rows)


def _group(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, group: Group
) -> argparse.ArgumentParser | argparse._ArgumentGroup:
    if group.exclusive:
        return parser.add_mutually_exclusive_group(required=group.required)
    assert isinstance(parser, argparse.ArgumentParser), "argument groups do not nest"
    return parser.add_argument_group(group.title)


def _flat(rows: Sequence[Row]) -> Iterator[SpecOption | Switch]:
    for row in rows:
        if isinstance(row, Group):
            yield from _flat(row.rows)
        elif not isinstance(row, Flag):
            yield row


def _put(values: dict[str, Any], path: str, value: Any) -> None:
    *sections, name = path.split(".")
    for section in sections:
        values = values.setdefault(section, {})
    if isinstance(value, dict):  # a section: what other options put there stays
        values.setdefault(name, {}).update(value)
    else:
        values[name] = value


def spec_values(rows: Sequence[Row], args: argparse.Namespace) -> dict[str, Any]:
    """The spec, as nested dicts, from the options given (in table order: a later row wins
    over an earlier one setting the same field); sections with no option given are left out,
    so the spec's defaults apply."""
    values: dict[str, Any] = {}
    for row in _flat(rows):
        given = getattr(args, row.dest)
        if isinstance(row, Switch):
            for path, value in row.sets.items() if given else ():
                _put(values, path, value)
        elif given is not None:
            for path in (row.path, *row.also):
                _put(values, path, given)
            for path, value in row.implies.items():
                _put(values, path, value)
    return values


# The quality gate's options, on every command that saves a model (prune, search, retrain).
QUALITY_GATE_ROWS: tuple[Row, ...] = (
    Group(
        None,
        (
            SpecOption("quality_gate.max_ppl_ratio", "--max-ppl-ratio"),
            Switch(
                "--no-quality-gate",
                {"quality_gate.max_ppl_ratio": None},
                help="save the model whatever its held-out perplexity",
            ),
        ),
        exclusive=True,
    ),
    SpecOption("quality_gate.windows", "--gate-windows"),
)
