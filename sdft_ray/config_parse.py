"""Reading a config: YAML files (with ``extends``), ``key.sub=value`` overrides, typed by the dataclasses.

Generic over any dataclass tree; the tree itself and its rules live in config.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from sdft_ray.errors import ConfigError, first_line


def convert(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:  # the allowed values are the type: one source for the check, the docs and the help
        allowed = typing.get_args(typ)
        text = "" if value is None else str(value)
        if isinstance(value, (dict, list)) or text not in allowed:
            shown = ", ".join(repr(a) if a == "" else a for a in allowed)
            raise ConfigError(f"{key}={value!r}; choose one of {shown}")
        return text
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if dataclasses.is_dataclass(item_type):
            out = []
            for i, v in enumerate(value):
                if not isinstance(v, dict):
                    raise ConfigError(f"{key}[{i}]: expected a mapping of {item_type.__name__} fields")
                node = item_type()
                apply(node, v, f"{key}[{i}].")
                out.append(node)
            return out
        return [convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(convert(v, t, key) for v, t in zip(value, typing.get_args(typ), strict=True))
    if typ is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {typ}")


def apply(node: Any, updates: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(node))
    names = [f.name for f in dataclasses.fields(node)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: is a section; set its fields, e.g. {full}.{names[0]}=...")
            apply(current, value, f"{full}.")
        else:
            setattr(node, key, convert(value, hints[key], full))


def nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            merge(a[k], v)
        else:
            a[k] = v
    return a


def read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's sections; ``extends: other.yaml`` (relative to this file) is read first, then overridden."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in seen:
        raise ConfigError(f"{p}: 'extends' loops back to itself")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({first_line(e)})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    parent = loaded.pop("extends", None)
    if parent is None:
        return loaded
    if not isinstance(parent, str):
        raise ConfigError(f"{p}: 'extends' must be a file name")
    return merge(read_yaml(p.parent / parent, (*seen, p.resolve())), loaded)


def non_finite(node: Any, prefix: str = "") -> str | None:
    """The first float setting that is inf or nan (``train.lr=inf`` parses as a float, then breaks sampling)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            found = non_finite(value, f"{prefix}{f.name}.")
            if found:
                return found
        elif isinstance(value, float) and not math.isfinite(value):
            return f"{prefix}{f.name}={value}"
    return None


def raw_settings(path: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """The nested settings of a YAML file (if any) with ``key.sub=value`` overrides applied last."""
    raw = read_yaml(Path(path)) if path else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, _, text = item.partition("=")
        # Overrides are typed by the dataclass, so the YAML parse only matters for lists.
        raw = merge(raw, nest(key.strip(), text))
    return raw
