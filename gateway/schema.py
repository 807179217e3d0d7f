"""Typed TOML tables: mapping -> frozen dataclass, every problem named by its dotted key.

One converter serves the gateway config and every policy's ``Options``, so an
operator sees the same kind of message for ``relay.port`` and for
``policies.attachments.max_size``. Problems are collected, not raised one at a
time: a config with three typos reports three lines.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

__all__ = ["Problems", "Range", "SchemaError", "build", "describe"]

T = TypeVar("T")

_MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """``Annotated[int, Range(1, 65535)]``: an inclusive bound, checked with the type."""

    low: float
    high: float

    def text(self) -> str:
        def fmt(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else str(v)

        return f"{fmt(self.low)}..{fmt(self.high)}"


class SchemaError(ValueError):
    """One or more problems; ``problems`` are lines like ``relay.port: must be ...``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Problems:
    """Collects problems while a config is checked."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.lines.append(f"{key}: {message}" if key else message)

    def raise_if_any(self) -> None:
        if self.lines:
            raise SchemaError(self.lines)


def describe(value: Any) -> str:
    """How a value is shown in an error message: like TOML would write it."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "an array"
    if origin in (dict, Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping)):
        return "a table"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str, problems: Problems) -> Any:
    """Convert ``value`` to ``tp`` or record a problem and return _MISSING."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Annotated:
        base, *marks = args
        bounds = [m for m in marks if isinstance(m, Range)]
        what = _type_name(base) + "".join(" " + b.text() for b in bounds)
        sub = Problems()
        out = _convert(base, value, key, sub)
        if sub.lines or any(not b.low <= out <= b.high for b in bounds):
            problems.add(key, f"must be {what}, got {describe(value)}")
            return _MISSING
        return out
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            sub = Problems()
            out = _convert(arg, value, key, sub)
            if not sub.lines:
                return out
        problems.add(key, f"must be {_type_name(tp)}, got {describe(value)}")
        return _MISSING
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        hint = _did_you_mean(str(value), [str(a) for a in args])
        problems.add(key, f"must be {_type_name(tp)}, got {describe(value)}{hint}")
        return _MISSING
    elif origin is tuple:
        if isinstance(value, list):
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
            return _MISSING if _MISSING in items else tuple(items)
    elif origin is list:
        if isinstance(value, list):
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
            return _MISSING if _MISSING in items else items
    elif origin in (dict, Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping)):
        if isinstance(value, dict):
            val_tp = args[1] if len(args) == 2 else Any
            out = {k: _convert(val_tp, v, f"{key}.{k}", problems) for k, v in value.items()}
            return _MISSING if _MISSING in out.values() else types.MappingProxyType(out)
    elif dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, dict):
            try:
                return _build(tp, value, key, problems)
            except _Failed:
                return _MISSING
    else:  # pragma: no cover - a schema bug, not an operator error
        raise TypeError(f"unsupported option type {tp!r} at {key}")
    problems.add(key, f"must be {_type_name(tp)}, got {describe(value)}")
    return _MISSING


class _Failed(Exception):
    pass


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _build(cls: type[T], table: Mapping[str, Any], prefix: str, problems: Problems) -> T:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    before = len(problems.lines)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            hint = _did_you_mean(key, list(fields))
            problems.add(dotted, f"unknown key{hint}")
            continue
        out = _convert(hints[key], value, dotted, problems)
        if out is not _MISSING:
            kwargs[key] = out
    for name, f in fields.items():
        if name not in table and f.default is _MISSING and f.default_factory is _MISSING:
            problems.add(f"{prefix}.{name}" if prefix else name, "is required")
    if len(problems.lines) > before:
        raise _Failed
    try:
        return cls(**kwargs)
    except ValueError as exc:
        # __post_init__ validation: "key: message" names the field within the table.
        sub = getattr(exc, "key", None)
        msg = getattr(exc, "message", None) or str(exc)
        where = f"{prefix}.{sub}" if prefix and sub else (sub or prefix)
        problems.add(where, msg)
        raise _Failed from None


def build(cls: type[T], table: Mapping[str, Any], prefix: str, problems: Problems) -> T | None:
    """Build ``cls`` from ``table``; on problems record them and return None."""
    try:
        return _build(cls, table, prefix, problems)
    except _Failed:
        return None
