"""Typed configuration: dataclasses built from nested dicts with strict validation.

``from_dict`` rejects unknown keys and values of the wrong type with a message naming the full
dotted key, so ``stage1.lr=abc`` fails as ``stage1.lr: expected float, got str 'abc'``.
``apply_overrides`` applies ``key=value`` strings (values parsed as YAML scalars).

A key that was renamed stays accepted: a config class lists ``RENAMED_KEYS = {"old": "new"}`` (a
class attribute, not a field), and the old key is read as the new one with one log line, so
configs saved by earlier versions keep loading.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["ConfigError", "apply_overrides", "from_dict", "load_yaml", "parse_override", "to_dict"]


log = logging.getLogger("dpt_engine")


class ConfigError(ValueError):
    """A configuration value or key is invalid. The message names the key and the fix."""


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}."


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it (ints widen to float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() in get_args(tp):
            return str(value).lower()  # YAML reads `true` as a bool; the choice is the word
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (arg, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; missing keys take defaults, unknown keys fail."""
    data = dict(data or {})
    for old, new in getattr(cls, "RENAMED_KEYS", {}).items():
        if old in data:
            if new in data:
                raise ConfigError(
                    f"config keys '{prefix}{old}' and '{prefix}{new}' both given: '{old}' is the old "
                    f"name of '{new}'; keep only '{prefix}{new}'"
                )
            _say_renamed(f"{prefix}{old}", f"{prefix}{new}")
            data[new] = data.pop(old)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"unknown config key '{prefix}{k}'.{_suggest(k, list(fields))}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:  # name the section when the message does not (stage1 vs stage3)
            msg, section = str(e), prefix.rstrip(".")
            if (
                section
                and not msg.startswith((section + ".", section + ":"))
                and "." not in msg.split(" ")[0]
            ):
                raise ConfigError(f"{section}.{msg}") from None
            raise
    return obj


@functools.cache
def _say_renamed(old: str, new: str) -> None:
    log.info("config key %s is now %s; read as %s", old, new, new)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON/YAML-serialisable dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. stage1.steps=500)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_float(value):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string
    return key, value


def _looks_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Set dotted keys in nested dict ``data`` from ``key=value`` strings (in place; returned).

    When ``cls`` is given, each key is checked against the dataclass tree before it is set, so
    a typo fails with the valid alternatives rather than later.
    """
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        section = _check_path(cls, parts, key) if cls is not None else None
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
        for old, new in getattr(section, "RENAMED_KEYS", {}).items():
            if new == parts[-1]:
                node.pop(old, None)  # the override wins over an old-named key from a saved config
    return data


def _check_path(cls: type, parts: list[str], full: str) -> Any:
    """Check dotted ``parts`` against the dataclass tree (renamed keys are rewritten in place to
    their new names); returns the dataclass that holds the last key."""
    tp: Any = cls
    done: list[str] = []
    section: Any = cls
    for p in parts:
        while get_origin(tp) in (Union, types.UnionType):
            tp = next(a for a in get_args(tp) if a is not type(None))
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override '{full}': '{'.'.join(done)}' has no sub-keys")
        hints = get_type_hints(tp)
        renamed = getattr(tp, "RENAMED_KEYS", {})
        if p in renamed:
            _say_renamed(".".join([*done, p]), ".".join([*done, renamed[p]]))
            p = parts[len(done)] = renamed[p]
        if p not in hints:
            raise ConfigError(f"unknown config key '{'.'.join([*done, p])}'.{_suggest(p, list(hints))}")
        section = tp
        tp = hints[p]
        done.append(p)
    return section


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a YAML file to --config")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text; pass a YAML file to --config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data
