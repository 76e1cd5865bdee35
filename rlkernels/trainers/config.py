"""Trainer configuration: dataclasses read from JSON, TOML or YAML files and
`key=value` overrides.  Unknown keys and impossible values fail at start with a
`ConfigError` that names the key (dotted for nested sections, e.g. `model.n_head`)."""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; `key` is the dotted name of the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


def _unknown_key(cls, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(prefix + key, f"unknown key for {cls.__name__}{hint}; known keys: {', '.join(names)}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks (and gently converts: int -> float, str from the command line) one value."""
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
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(key, f"expected {annotation}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        item = args[0] if args else Any
        converted = [_coerce(v, item, key) for v in value]
        return tuple(converted) if origin is tuple else converted
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    if is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a section (mapping), got {value!r}")
        return annotation.from_dict(value, prefix=key + ".")
    return value


@dataclass
class Config:
    """Base of every trainer config.  Subclasses add fields and extend `check()`."""

    def __post_init__(self):
        self.check()

    @classmethod
    def from_dict(cls, data: dict, *, prefix: str = ""):
        if not isinstance(data, dict):
            raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in fields(cls) if f.init}
        kwargs = {}
        for key, value in data.items():
            if key not in known:
                raise _unknown_key(cls, key, prefix)
            kwargs[key] = _coerce(value, hints[key], prefix + key)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            if prefix and not exc.key.startswith(prefix):
                raise ConfigError(prefix + exc.key, str(exc).split(": ", 1)[1]) from None
            raise

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        merged = self.to_dict()
        merged.update(changes)
        return type(self).from_dict(merged)

    def check(self) -> None:
        """Raises ConfigError for impossible values; subclasses call super().check()."""

    # helpers for check()
    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is None or value <= 0:
                raise ConfigError(name, f"must be > 0, got {value!r}")

    def _non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is None or value < 0:
                raise ConfigError(name, f"must be >= 0, got {value!r}")

    def _in_unit(self, *names: str, closed: bool = True) -> None:
        for name in names:
            value = getattr(self, name)
            ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
            if not ok:
                bounds = "[0, 1]" if closed else "(0, 1)"
                raise ConfigError(name, f"must lie in {bounds}, got {value!r}")

    def _divides(self, small: str, big: str) -> None:
        a, b = getattr(self, small), getattr(self, big)
        if b % a != 0:
            raise ConfigError(small, f"{small}={a} must divide {big}={b}")

    def _one_of(self, name: str, choices) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(name, f"must be one of {list(choices)}, got {value!r}")


def read_file(path: str) -> dict:
    """A config file as a dict: .json, .toml, or .yaml/.yml (needs PyYAML)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as fh:
        raw = fh.read()
    if ext == ".json":
        data = json.loads(raw.decode())
    elif ext == ".toml":
        import tomllib

        data = tomllib.loads(raw.decode())
    elif ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml); or use JSON/TOML") from exc
        data = yaml.safe_load(raw.decode()) or {}
    else:
        raise ValueError(f"config file {path}: unknown extension {ext!r} (use .json, .toml, .yaml)")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: the top level must be a mapping")
    return data


def parse_overrides(items) -> dict:
    """['lr=1e-3', 'model.n_layer=2'] -> nested dict; values parsed as JSON when they can be."""
    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return out


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build(cls, *sources: dict):
    """`cls` from several dicts, later ones overriding earlier ones."""
    merged: dict = {}
    for source in sources:
        if source:
            merged = merge(merged, source)
    return cls.from_dict(merged)


__all__ = ["Config", "ConfigError", "build", "field", "merge", "parse_overrides", "read_file"]
