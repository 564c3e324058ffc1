"""Command-line flags generated from the settings dataclasses (``TrainConfig``, ``POETConfig``).

Every field declared with :func:`poetx.settings.setting` becomes a flag: ``--field-name`` (or the
field's ``flag``), of the annotation's type, with its help text, choices and ``--help`` group. A
flag's value goes through the field's own check (the same one the dataclass runs), so a bad
value is an argparse usage error on one line, e.g. ``argument --steps: must be at least 1, got
0``. Booleans get ``--x`` / ``--no-x``; ``tuple[str, ...]`` fields take one or more values and
may repeat. Flags that are not given are absent from the result, so they never override a TOML
file or a resumed run's settings.

A nested settings class (``POETConfig`` in ``TrainConfig.poet``) gets the same flat names; a
name both classes use gets the nested class's prefix (``--poet-seed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from poetx.settings import (
    SettingError,
    base_type,
    check_value,
    choices_of,
    declared_fields,
    field_info,
)

_METAVARS = {int: "N", float: "X", str: "TEXT"}


@dataclass(frozen=True)
class Flag:
    """One generated flag: where its value goes in the settings dict."""

    option: str
    dest: str
    field: str
    nested: str | None  # key of the nested table ("poet"), or None


def _parser_of(f: dataclasses.Field, hint: Any, item: bool) -> Callable[[str], Any]:
    info = field_info(f)
    typ, _ = base_type(hint)
    if item:
        typ = typing.get_args(typ)[0]

    def parse(text: str) -> Any:
        try:
            if info.get("parse") is not None:
                value = info["parse"](text)
            elif typ is int:
                value = int(text)
            elif typ is float:
                value = float(text)
            else:
                value = text
        except ValueError:
            kind = "an integer" if typ is int else "a number" if typ is float else "a value"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            check_value(f, hint, (value,) if item else value)
        except SettingError as e:
            raise argparse.ArgumentTypeError(e.problem) from None
        return value

    return parse


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(base_type(hint)[0]) is tuple


def add_settings_flags(parser: argparse.ArgumentParser, cls: type,
                       nested: dict[str, type] | None = None) -> list[Flag]:
    """Add a flag for every declared field of ``cls`` and of the ``nested`` classes
    (``{"poet": POETConfig}``); returns the flags for :func:`collect_settings`."""
    sources: list[tuple[type, str | None]] = [(cls, None)]
    sources += [(sub, key) for key, sub in (nested or {}).items()]
    top_names = {f.name for f, _ in declared_fields(cls)}
    groups = {g.title: g for g in parser._action_groups}  # join groups the caller made
    flags: list[Flag] = []
    for source, key in sources:
        for f, hint in declared_fields(source):
            info = field_info(f)
            name = f.name if key is None or f.name not in top_names else f"{key}_{f.name}"
            option = info.get("flag") or "--" + name.replace("_", "-")
            dest = name if key is None else f"{key}.{f.name}"
            group_name = info.get("group") or "settings"
            if group_name not in groups:
                groups[group_name] = parser.add_argument_group(group_name)
            group = groups[group_name]
            help_text = (info.get("help") or "").replace("%", "%%")  # argparse formats help
            default = f.default
            if default is not dataclasses.MISSING and default is not None and \
                    not isinstance(default, bool) and "(default" not in help_text:
                help_text += f" (default {default})"
            kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS,
                                      "help": help_text}
            typ, _ = base_type(hint)
            if typ is bool:
                if default is None:  # filled from the preset; the help text says how
                    kwargs["help"] = help_text
                else:
                    state = "on" if default is True else "off"
                    kwargs["help"] = f"{help_text} (default {state})"
                group.add_argument(option, action=argparse.BooleanOptionalAction, **kwargs)
            else:
                choices = choices_of(f)
                if choices is not None:
                    kwargs["choices"] = choices
                else:
                    kwargs["type"] = _parser_of(f, hint, item=_is_tuple(hint))
                    item = typing.get_args(typ)[0] if _is_tuple(hint) else typ
                    kwargs["metavar"] = info.get("metavar") or _METAVARS.get(item, "VALUE")
                if _is_tuple(hint):
                    kwargs.update(nargs="+", action="extend")
                group.add_argument(option, **kwargs)
            flags.append(Flag(option, dest, f.name, key))
    return flags


def collect_settings(args: argparse.Namespace, flags: list[Flag]) -> dict[str, Any]:
    """The given flags as a settings dict (nested tables for nested classes), ready to merge
    over a TOML file's settings."""
    out: dict[str, Any] = {}
    for flag in flags:
        if not hasattr(args, flag.dest):
            continue
        value = getattr(args, flag.dest)
        if isinstance(value, list):
            value = tuple(value)
        target = out if flag.nested is None else out.setdefault(flag.nested, {})
        target[flag.field] = value
    return out


def value_parser(cls: type, name: str) -> Callable[[str], Any]:
    """The parser of field ``name`` of ``cls``, for a flag of another command (``eval``)."""
    for f, hint in declared_fields(cls):
        if f.name == name:
            return _parser_of(f, hint, item=False)
    raise KeyError(f"{cls.__name__} has no setting {name!r}")
