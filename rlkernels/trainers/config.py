"""Trainer configuration: dataclasses read from JSON, TOML or YAML files and
`key=value` overrides.  Unknown keys and impossible values fail at start with a
`ConfigError` that names the key (dotted for nested sections, e.g. `model.n_head`)."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import stat
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
        raise ConfigError(key, f"expected an integer, got {value!r:.80}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                pass
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(key, f"expected a number, got {value!r:.80}")
        if not math.isfinite(number):
            raise ConfigError(key, f"must be a finite number, got {value!r:.80}")
        return number
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
            if not isinstance(key, str) or key not in known:
                raise _unknown_key(cls, str(key), prefix)
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

    def _at_most(self, name: str, limit) -> None:
        value = getattr(self, name)
        if value is not None and value > limit:
            raise ConfigError(name, f"must be <= {limit}, got {value!r}")

    def _one_of(self, name: str, choices) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(name, f"must be one of {list(choices)}, got {value!r}")


MAX_CONFIG_BYTES = 1 << 20


class ConfigFileError(ValueError):
    """A config file that cannot be read as a mapping of config keys; names the file."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"config file {path}: {message}")


class MissingConfigFileError(ConfigFileError, FileNotFoundError):
    pass


def _config_bytes(path: str) -> bytes:
    """The file's bytes; only a regular file of at most MAX_CONFIG_BYTES is read (a FIFO
    or device is refused without waiting on it)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise MissingConfigFileError(path, "not found") from None
    except OSError as exc:
        raise ConfigFileError(path, f"cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigFileError(path, "is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigFileError(path, "is not a regular file (a FIFO, socket or device); refused")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigFileError(path, f"is {info.st_size} bytes; config files are limited to {MAX_CONFIG_BYTES}")
        return os.read(fd, MAX_CONFIG_BYTES + 1)[:MAX_CONFIG_BYTES]
    except OSError as exc:
        raise ConfigFileError(path, f"cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)


def _config_text(path: str, raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(raw) > 1 and b"\x00" in raw[:4]):
        raise ConfigFileError(path, "is UTF-16 (or another wide encoding); save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(path, f"is not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise ConfigFileError(path, "is empty")
    return text


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_file(path: str) -> dict:
    """A config file as a dict: .json, .toml, or .yaml/.yml (needs PyYAML).  Any problem
    with the file (missing, not a regular file, too large, not UTF-8, empty, a syntax
    error, not a mapping) raises ConfigFileError (a ValueError) naming it."""
    raw = _config_bytes(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".toml", ".yaml", ".yml"):
        raise ConfigFileError(path, f"unknown extension {ext!r} (use .json, .toml, .yaml)")
    text = _config_text(path, raw)
    if ext == ".json":
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise ConfigFileError(path, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except (ValueError, RecursionError) as exc:
            raise ConfigFileError(path, f"is not valid JSON: {exc}") from None
    elif ext == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, RecursionError) as exc:
            raise ConfigFileError(path, f"is not valid TOML: {exc}") from None
    else:
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigFileError(path, "needs PyYAML (pip install pyyaml); or use JSON/TOML") from exc
        try:
            data = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            reason = " ".join(str(exc).split())
            raise ConfigFileError(path, f"is not valid YAML (or uses a tag that is refused): {reason}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(path, f"the top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def parse_overrides(items) -> dict:
    """['lr=1e-3', 'model.n_layer=2'] -> nested dict; values parsed as JSON when they can be."""
    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(item, f"--set {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(key, f"--set {item!r}: the key must be a name, or dotted names (model.n_layer)")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON (or a number too long to convert): the text itself
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"--set {item!r} conflicts with an earlier --set of {part}")
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


__all__ = ["Config", "ConfigError", "ConfigFileError", "build", "field", "merge", "parse_overrides", "read_file"]
