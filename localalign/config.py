"""Dataclass configs from TOML files and command-line flags, and back to TOML.

Each stage owns a dataclass whose fields carry their defaults and the reasons for them.
A run's config is those dataclasses nested under one `AlignConfig`; a TOML file can set any
field (a `[train]` table sets `TrainConfig` fields, and so on) and flags override the file.
The resolved config is written into the run directory, so a run can always be repeated.

Unknown keys and values of the wrong type are errors, not ignored: a typo in a config file
that silently trains with the default is worse than a refusal.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from localalign.errors import UserError

T = TypeVar("T")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such config file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `values`, checking every key and type; nested tables recurse."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a table, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)  # each config checks its ranges in __post_init__ and raises UserError
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise UserError(f"{where}: must be one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise UserError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def to_toml(values: dict[str, Any]) -> str:
    """A minimal TOML writer for configs: scalars, lists of scalars, nested tables; None omitted."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, table in tables:
        out += _toml_table(key, table)
    return out


def _toml_table(prefix: str, table: dict[str, Any]) -> str:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
    out = f"\n[{prefix}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in scalars.items())
    for k, v in table.items():
        if isinstance(v, dict):
            out += _toml_table(f"{prefix}.{k}", v)
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
