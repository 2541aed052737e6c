"""The Hydra edge shared by the jobs: schema registration, override pre-checks, and the
conversion of the composed config into tidal's frozen, validated dataclasses.

Only jobs/ import hydra and omegaconf; the library sees plain dataclasses.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import typing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # a checkout that was not pip-installed (e.g. a `ray job submit` working dir)
    import tidal  # noqa: F401
except ImportError:
    sys.path[:0] = [os.path.join(ROOT, "platform"), os.path.join(ROOT, "kernels")]
    os.environ["TIDAL_SHIP_CODE"] = "1"  # Ray workers get the library as a py_module

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")

from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from tidal.config import ConfigError, allowed_keys, from_dict  # noqa: E402


def _mutable_twin(cls: type, cache: dict) -> type:
    """A non-frozen copy of a frozen dataclass tree (OmegaConf makes frozen ones read-only,
    which would refuse every override)."""
    if cls in cache:
        return cache[cls]
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            tp = typing.List[_mutable_twin(args[0], cache)]  # e.g. data.mixture entries
        if dataclasses.is_dataclass(tp):
            twin = _mutable_twin(tp, cache)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            values = dataclasses.asdict(default) if default is not None else {}
            fields.append((f.name, twin, dataclasses.field(
                default_factory=lambda twin=twin, values=values: _instantiate(twin, values))))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, tp, dataclasses.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, tp, dataclasses.field(default=f.default)))
    cache[cls] = dataclasses.make_dataclass(cls.__name__, fields)
    return cache[cls]


def _instantiate(twin: type, values: dict):
    hints = typing.get_type_hints(twin)
    kwargs = {k: (_instantiate(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v)
              for k, v in values.items()}
    return twin(**kwargs)


def register(name: str, schema: type) -> None:
    """Register ``schema`` in Hydra's ConfigStore (used as the first entry of ``defaults``)."""
    ConfigStore.instance().store(name=name, node=_mutable_twin(schema, {}))


def precheck_overrides(schema: type, argv: list[str]) -> None:
    """Refuse unknown keys on the command line with the list of allowed ones, before Hydra
    composes anything (Hydra alone names the key but not the alternatives)."""
    problems = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~").replace("/", ".")  # data/curation=off: a group
        if key.startswith("hydra.") or key == "hydra":
            continue
        if os.path.isdir(os.path.join(ROOT, "conf", key.replace(".", os.sep))):
            continue  # a config group choice (model=tiny, sweep=pbt): Hydra checks the name
        allowed = allowed_keys(schema, key)
        if allowed is not None:
            import difflib

            close = difflib.get_close_matches(key.rsplit(".", 1)[-1], allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{key}: unknown key{hint}; allowed here: {', '.join(allowed)}")
    if problems:
        fail(ConfigError(problems))


def fail(err: ConfigError) -> typing.NoReturn:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def fail_line(err: BaseException, code: int = 2) -> typing.NoReturn:
    """Refused input found after composition (a file, a checkpoint): one clear line."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(code)


def build(cfg: DictConfig, schema: type, validate) -> typing.Any:
    """Composed Hydra config -> frozen dataclasses, validated; exits 2 on bad input."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    try:
        return validate(from_dict(schema, data))
    except ConfigError as err:
        fail(err)
