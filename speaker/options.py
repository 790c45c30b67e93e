"""Option schemas for components, and the value types that pipeline files use.

A component declares its options as a dataclass named ``Options``, with one
field per option made by ``option()``. The validator, the ``components``
command and the docs all read that one declaration, so what a user may write
and what the help prints cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

_MISSING = dataclasses.MISSING


class Duration(float):
    """A duration in seconds, written in pipeline files as ``"500ms"``, ``"2s"``, ``"1m"`` or ``"1h"``."""

    _UNITS: typing.ClassVar[dict[str, float]] = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    _PATTERN: typing.ClassVar[re.Pattern[str]] = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|ms|s|m|h)\s*")

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse ``text`` such as ``"1.5s"``. Raises ValueError with the accepted units."""
        match = cls._PATTERN.fullmatch(text)
        if match is None:
            raise ValueError(f'invalid duration {text!r}: write a number and a unit, such as "500ms", "2s", "1m" or "1h"')
        return cls(float(match.group(1)) * cls._UNITS[match.group(2)])

    def __str__(self) -> str:
        if self == 0:
            return "0s"
        for unit in ("h", "m", "s", "ms"):
            count = self / self._UNITS[unit]
            if count >= 1 and math.isclose(count, round(count), abs_tol=1e-9):
                return f"{round(count)}{unit}"
        return f"{round(self * 1e6)}us"


class ByteSize(int):
    """A size in bytes, written as ``"64KiB"``, ``"16MiB"``, ``"1GiB"`` or a plain integer."""

    _UNITS: typing.ClassVar[dict[str, int]] = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    _PATTERN: typing.ClassVar[re.Pattern[str]] = re.compile(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*")

    @classmethod
    def parse(cls, text: str) -> ByteSize:
        """Parse ``text`` such as ``"16MiB"``. Raises ValueError with the accepted units."""
        match = cls._PATTERN.fullmatch(text)
        if match is None:
            raise ValueError(f'invalid size {text!r}: write an integer and a unit, such as "64KiB", "16MiB" or "1GiB"')
        return cls(int(match.group(1)) * cls._UNITS[match.group(2) or ""])

    def __str__(self) -> str:
        for unit in ("GiB", "MiB", "KiB"):
            if self and self % self._UNITS[unit] == 0:
                return f"{self // self._UNITS[unit]}{unit}"
        return str(int(self))


def option(
    default: Any = _MISSING,
    *,
    help: str,
    min: float | None = None,
    max: float | None = None,
    example: Any = _MISSING,
) -> Any:
    """Declare one option of a component's ``Options`` dataclass.

    ``help`` says what the option sets and in what unit. Leave out ``default``
    for a required option. Lists and dicts are copied per component, so a
    mutable default is safe here. ``min`` and ``max`` bound numbers and durations.
    """
    metadata = {"help": help, "min": min, "max": max, "example": example}
    if isinstance(default, (list, dict, set)):
        frozen_default = default
        return dataclasses.field(default_factory=lambda: type(frozen_default)(frozen_default), metadata=metadata)
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option as the validator and the ``components`` command see it."""

    name: str
    annotation: Any
    required: bool
    default: Any
    help: str
    min: float | None
    max: float | None

    @property
    def type_text(self) -> str:
        """Return the option's type as a user writes it in TOML, such as ``duration`` or ``list of string``."""
        return describe_type(self.annotation)

    @property
    def default_text(self) -> str:
        if self.required:
            return "(required)"
        return format_value(self.default)


class OptionError(ValueError):
    """An option value that does not match its declared type.

    ``key_path`` is the path inside the value, such as ``env[2]``, so the
    config loader can name the exact key.
    """

    def __init__(self, message: str, key_path: str = "") -> None:
        super().__init__(message)
        self.key_path = key_path


def option_specs(options_class: type) -> list[OptionSpec]:
    """Return the option specs of an ``Options`` dataclass, in declaration order."""
    hints = typing.get_type_hints(options_class)
    specs = []
    for field in dataclasses.fields(options_class):
        if field.default is not _MISSING:
            default, required = field.default, False
        elif field.default_factory is not _MISSING:
            default, required = field.default_factory(), False
        else:
            default, required = None, True
        specs.append(
            OptionSpec(
                name=field.name,
                annotation=hints[field.name],
                required=required,
                default=default,
                help=field.metadata.get("help", ""),
                min=field.metadata.get("min"),
                max=field.metadata.get("max"),
            )
        )
    return specs


def build_options(options_class: type, raw: Mapping[str, Any]) -> Any:
    """Validate ``raw`` (one TOML table without ``type`` and ``inputs``) and build ``options_class``.

    Raises OptionError for an unknown key (with the closest known key), a
    missing required key, or a value of the wrong type. The error's
    ``key_path`` names the offending key.
    """
    specs = {spec.name: spec for spec in option_specs(options_class)}
    for key in raw:
        if key not in specs:
            raise OptionError(unknown_key_message(key, specs), key)
    values = {}
    for name, spec in specs.items():
        if name not in raw:
            if spec.required:
                raise OptionError(f"missing required option {name!r}: {spec.help}", name)
            continue
        try:
            value = convert_value(spec.annotation, raw[name])
        except OptionError as exc:
            raise OptionError(str(exc), name + exc.key_path) from None
        check_bounds(spec, value)
        values[name] = value
    return options_class(**values)


def unknown_key_message(key: str, known: Mapping[str, Any] | Sequence[str]) -> str:
    names = sorted(known)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(names) if names else "none"
    return f"unknown option {key!r}{hint} (known options: {listing})"


def check_bounds(spec: OptionSpec, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if spec.min is not None and value < spec.min:
            raise OptionError(f"{format_value(value)} is below the minimum {format_value(spec.min)}", spec.name)
        if spec.max is not None and value > spec.max:
            raise OptionError(f"{format_value(value)} is above the maximum {format_value(spec.max)}", spec.name)


def convert_value(annotation: Any, value: Any) -> Any:
    """Convert a TOML value to ``annotation``, or raise OptionError saying what was expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_value(arg, value)
            except OptionError as exc:
                errors.append(str(exc))
        raise OptionError(" or ".join(dict.fromkeys(errors)))
    if origin is Literal:
        if value in args:
            return value
        choices = ", ".join(repr(arg) for arg in args)
        raise OptionError(f"invalid value {value!r}: expected one of {choices}")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            choices = ", ".join(repr(member.value) for member in annotation)
            raise OptionError(f"invalid value {value!r}: expected one of {choices}") from None
    if annotation is Duration:
        if isinstance(value, str):
            try:
                return Duration.parse(value)
            except ValueError as exc:
                raise OptionError(str(exc)) from None
        raise OptionError(f'expected a duration string such as "2s", got {describe_value(value)}')
    if annotation is ByteSize:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return ByteSize(value)
        if isinstance(value, str):
            try:
                return ByteSize.parse(value)
            except ValueError as exc:
                raise OptionError(str(exc)) from None
        raise OptionError(f'expected a size such as "16MiB", got {describe_value(value)}')
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise OptionError(f"expected true or false, got {describe_value(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise OptionError(f"expected an integer, got {describe_value(value)}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise OptionError(f"expected a number, got {describe_value(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise OptionError(f"expected a string, got {describe_value(value)}")
    if annotation is Path:
        if isinstance(value, str) and value:
            return Path(value)
        raise OptionError(f"expected a path string, got {describe_value(value)}")
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, list):
            raise OptionError(f"expected a list, got {describe_value(value)}")
        item_type = args[0] if args else Any
        items = []
        for index, item in enumerate(value):
            try:
                items.append(convert_value(item_type, item))
            except OptionError as exc:
                raise OptionError(str(exc), f"[{index}]{exc.key_path}") from None
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        if not isinstance(value, dict):
            raise OptionError(f"expected a table, got {describe_value(value)}")
        value_type = args[1] if args else Any
        converted = {}
        for key, item in value.items():
            try:
                converted[key] = convert_value(value_type, item)
            except OptionError as exc:
                raise OptionError(str(exc), f".{key}{exc.key_path}") from None
        return converted
    if annotation is Any:
        return value
    raise TypeError(f"option type {annotation!r} is not supported by speaker.options")


def describe_value(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return f"{names.get(type(value), type(value).__name__)} ({format_value(value)})"


def describe_type(annotation: Any) -> str:
    """Name a type the way a pipeline file writes it."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arg) for arg in args if arg is not type(None))
    if origin is Literal:
        return " | ".join(repr(arg) for arg in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(member.value) for member in annotation)
    if origin in (list, tuple, Sequence):
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return f"table of {describe_type(args[1])}" if args else "table"
    simple = {
        Duration: "duration",
        ByteSize: "size",
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        Path: "path",
        Any: "any",
    }
    return simple.get(annotation, getattr(annotation, "__name__", str(annotation)))


def format_value(value: Any, depth: int = 0) -> str:
    """Format a value as TOML would write it, for help and error messages.

    Lists and tables nested deeper than three levels are shortened to ``...``.
    """
    if depth > 3 and isinstance(value, (list, tuple, dict)):
        return "..."
    if isinstance(value, (Duration, ByteSize)):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return repr(value.value).replace("'", '"')
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Path):
        return format_value(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(item, depth + 1) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {format_value(item, depth + 1)}" for key, item in value.items()) + "}"
    if value is None:
        return "(none)"
    return str(value)
