"""Settings declared once, as dataclass fields: default, check, help text and command-line flag.

A field of ``POETConfig`` or ``TrainConfig`` is declared with :func:`setting`::

    steps: int | None = setting(None, "optimizer steps", check=at_least(1), group="optimization")

and that one line gives everything else:

* the dataclass validates it (``validate_fields``, called from ``__post_init__``): the type
  from the annotation (``int``, ``float``, ``str``, ``bool``, ``tuple[str, ...]``, ``X | None``)
  and then ``check``; errors are ``SettingError`` (a ``ValueError``) reading
  ``"<field>: <problem>"``;
* ``poetx train`` gets a flag ``--steps`` of that type, help text, choices and group
  (:mod:`poetx.cli.flags` generates the parser from the fields), and parses a flag's value
  through the very same check, so a bad flag is a one-line usage error;
* TOML files and ``config.json`` use the field names (``from_dict`` / ``to_dict``).

Adding a field to one of the two dataclasses is therefore all it takes to get a validated
setting, a flag and a TOML key. Torch-free on purpose: ``poetx --help`` must not import torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

Check = Callable[[Any], None]
"""Raises ``ValueError(problem)`` (without the field name) when a value is out of range."""


class SettingError(ValueError):
    """A setting has a bad value; ``str()`` is ``"<name>: <problem>"``."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def setting(default: Any = dataclasses.MISSING, help: str = "", *,
            check: Check | None = None,
            choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
            group: str = "settings", flag: str | None = None, metavar: str | None = None,
            parse: Callable[[str], Any] | None = None, default_factory: Any = dataclasses.MISSING,
            ) -> Any:
    """A dataclass field with what validation and the command line need.

    Args:
        default / default_factory: as in ``dataclasses.field``.
        help: one line for ``--help`` (also the documentation of the field).
        check: a range check run after the type check (see :func:`at_least` ...).
        choices: the allowed strings (or a function giving them, evaluated when used).
        group: ``--help`` section of the flag.
        flag: the flag's name when it is not ``--field-name``.
        metavar: placeholder of the value in ``--help``.
        parse: turns a flag's text into a value when the annotation's type cannot (e.g.
            ``"exact"`` -> ``None``).
    """
    metadata = {"help": help, "check": check, "choices": choices, "group": group,
                "flag": flag, "metavar": metavar, "parse": parse}
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"poetx": metadata})


def field_info(f: dataclasses.Field) -> dict[str, Any]:
    return f.metadata.get("poetx", {})


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    choices = field_info(f).get("choices")
    if callable(choices):
        choices = choices()
    return None if choices is None else tuple(choices)


# checks -----------------------------------------------------------------------------------------
def at_least(low: int | float, high: int | float | None = None) -> Check:
    """``low <= value`` (and ``<= high``)."""
    def check(value: Any) -> None:
        if value < low or (high is not None and value > high):
            upper = "" if high is None else f" and at most {high}"
            raise ValueError(f"must be at least {low}{upper}, got {value}")

    return check


def non_negative(value: Any) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite non-negative number, got {value}")


def positive(value: Any) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a finite positive number, got {value}")


def in_interval(low: float, high: float, open_low: bool = False) -> Check:
    """``low <= value <= high`` (``low < value`` with ``open_low``)."""
    def check(value: Any) -> None:
        below = value <= low if open_low else value < low
        if not math.isfinite(value) or below or value > high:
            interval = f"{'(' if open_low else '['}{low}, {high}]"
            raise ValueError(f"must be in {interval}, got {value}")

    return check


def matches(pattern: str, described: str) -> Check:
    regex = re.compile(pattern)

    def check(value: Any) -> None:
        if not regex.match(value):
            raise ValueError(f"must be {described}, got {value!r}")

    return check


def non_empty(value: Any) -> None:
    if not value:
        raise ValueError(f"must not be empty, got {value!r}")


def each(item_check: Check) -> Check:
    def check(values: Any) -> None:
        for v in values:
            item_check(v)

    return check


# validation -------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_type(hint: Any) -> tuple[Any, bool]:
    """``(type without None, None allowed)`` of an annotation such as ``int | None``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        return (rest[0] if len(rest) == 1 else hint), optional
    return hint, False


def _type_problem(value: Any, hint: Any) -> str | None:
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"must be an integer, got {value!r}"
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"must be a number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        ok = isinstance(value, tuple) and all(_type_problem(v, item) is None for v in value)
        return None if ok else f"must be a list of {item.__name__}s, got {value!r}"
    return None  # other types (nested dataclasses) check themselves


def check_value(f: dataclasses.Field, hint: Any, value: Any, name: str | None = None) -> None:
    """Type, choices and range check of one field's value; raises ``SettingError``."""
    name = name or f.name
    hint, optional = base_type(hint)
    if value is None:
        if optional:
            return
        raise SettingError(name, "must be set, got None")
    problem = _type_problem(value, hint)
    if problem is None:
        choices = choices_of(f)
        if choices is not None and value not in choices:
            problem = f"must be one of {', '.join(choices)}; got {value!r}"
    if problem is None and field_info(f).get("check") is not None:
        try:
            field_info(f)["check"](value)
        except ValueError as e:
            problem = str(e)
    if problem is not None:
        raise SettingError(name, problem)


def _is_settings_table(hint: Any) -> bool:
    """A field holding a nested settings class (``TrainConfig.poet``), not a value."""
    return any(dataclasses.is_dataclass(a) for a in (hint, *typing.get_args(hint)))


def declared_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """``(field, resolved annotation)`` of every value field of the settings class ``cls``.

    Fields declared with :func:`setting` bring their help, check and choices; a plain field
    (``x: int = 1``) still gets its type checked and a flag (help-less until it uses
    ``setting``). Fields holding a nested settings class are left to that class.
    """
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)
            if not _is_settings_table(hints[f.name])]


def validate_fields(obj: Any, names: Sequence[str] | None = None) -> None:
    """Check every value field of the dataclass ``obj`` (or those in ``names``)."""
    for f, hint in declared_fields(type(obj)):
        if names is None or f.name in names:
            check_value(f, hint, getattr(obj, f.name))


def reject_unknown(cls: type, d: dict[str, Any], source: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(names))}")
