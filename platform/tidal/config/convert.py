"""Plain dicts <-> frozen config dataclasses, with errors that name the key.

``from_dict`` is strict: an unknown key, a value of the wrong type or a missing required
section is reported with its dotted path and what is allowed there. All problems are
collected and raised together as one :class:`ConfigError`, so a user fixes them in one go.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from typing import Any, Dict, Iterable, List


class ConfigError(ValueError):
    """Invalid configuration. ``problems`` holds one message per offending key."""

    def __init__(self, problems: Iterable[str]):
        self.problems: List[str] = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null"
    if origin in (list, List):
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str, problems: List[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path, problems)
    if origin is typing.Literal:  # a choice: the schema lists what is allowed
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            problems.append(f"{path}: '{value}' is not one of {', '.join(map(str, allowed))}")
            return None
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a section ({tp.__name__}), got {value!r}")
            return None
        return _build(tp, value, path, problems)
    if origin in (list, List):
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return None
        return [_convert(arg, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping of {_type_name(key_tp)} to {_type_name(val_tp)}, "
                            f"got {value!r}")
            return None
        return {_convert(key_tp, k, f"{path}", problems): _convert(val_tp, v, f"{path}.{k}", problems)
                for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
        if not ok:
            problems.append(f"{path}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
            return None
        return value
    return value


def _build(cls: type, data: dict, prefix: str, problems: List[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{path}: unknown key{hint}; allowed keys: {', '.join(fields)}")
            continue
        kwargs[key] = _convert(hints[key], value, path, problems)
    if problems:
        return None
    return cls(**kwargs)


def from_dict(cls: type, data: dict) -> Any:
    """Build the frozen dataclass ``cls`` from ``data``; raise ConfigError naming bad keys."""
    problems: List[str] = []
    out = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems)
    return out


def to_dict(cfg: Any) -> dict:
    """The config as plain JSON-able dicts and lists."""
    return dataclasses.asdict(cfg)


def fingerprint(obj: Any, n: int = 12) -> str:
    """A short stable hash of a config (or any JSON-able value)."""
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def allowed_keys(cls: type, dotted: str) -> List[str] | None:
    """Check a dotted key against the schema ``cls``.

    Returns None when the key exists, otherwise the list of keys allowed at the first
    level where the path leaves the schema (used to explain a bad command-line override).
    """
    tp: Any = cls
    for part in dotted.split("."):
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if not dataclasses.is_dataclass(tp):
            return None  # below a leaf (e.g. a list index); Hydra checks the rest
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return list(hints)
        tp = hints[part]
    return None
