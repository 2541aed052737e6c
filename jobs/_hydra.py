"""The Hydra edge shared by the jobs: schema registration, override pre-checks, and the
conversion of the composed config into tidal's frozen, validated dataclasses.

Only jobs/ import hydra and omegaconf; the library sees plain dataclasses.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import traceback
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
        tp = _plain(hints[f.name])
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


def _plain(tp):
    """Literal choices as ``str`` (or ``Optional[str]``) for OmegaConf, which has no Literal
    type; ``from_dict`` checks the choice afterwards, naming what is allowed."""
    if typing.get_origin(tp) is typing.Literal:
        return type(typing.get_args(tp)[0])
    if typing.get_origin(tp) is typing.Union:
        args = [_plain(a) for a in typing.get_args(tp)]
        return typing.Optional[args[0]] if type(None) in args and len(args) == 2 else tp
    return tp


def _instantiate(twin: type, values: dict):
    hints = typing.get_type_hints(twin)
    kwargs = {k: (_instantiate(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v)
              for k, v in values.items()}
    return twin(**kwargs)


def register(name: str, schema: type) -> None:
    """Register ``schema`` in Hydra's ConfigStore (used as the first entry of ``defaults``)."""
    ConfigStore.instance().store(name=name, node=_mutable_twin(schema, {}))


def precheck_overrides(schema: type, argv: list[str]) -> None:
    """Refuse bad command-line overrides before Hydra composes anything: unknown keys (with
    the allowed ones), values of the wrong type (checked by OmegaConf against the schema, as
    Hydra would later) and config group options that do not exist."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    node = OmegaConf.structured(_mutable_twin(schema, {}))
    problems = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_overrides([arg])[0]
        except Exception as e:  # noqa: BLE001 - Hydra's grammar errors
            problems.append(f"{arg}: not a valid override ({_first_line(e)})")
            continue
        key = override.key_or_group.replace("/", ".")  # data/curation=off: a group
        if key.startswith("hydra.") or key == "hydra":
            continue
        group = os.path.join(ROOT, "conf", key.replace(".", os.sep))
        if os.path.isdir(group):  # a config group choice (model=tiny, sweep=pbt)
            value = override.value()
            options = sorted(f[:-5] for f in os.listdir(group) if f.endswith(".yaml"))
            if isinstance(value, str) and value not in options:
                problems.append(f"{key}: '{value}' is not one of {', '.join(options)}")
            continue
        allowed = allowed_keys(schema, key)
        if allowed is not None:
            import difflib

            close = difflib.get_close_matches(key.rsplit(".", 1)[-1], allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{key}: unknown key{hint}; allowed here: {', '.join(allowed)}")
            continue
        value = None if override.is_delete() else override.value()
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: resolved (and checked) at composition
        if any(part.isdigit() for part in key.split(".")):
            continue  # inside a list from the presets (data.mixture.0.weight): checked after composition
        try:
            OmegaConf.update(node, key, value, merge=True)
        except Exception as e:  # noqa: BLE001 - OmegaConf's validation errors
            problems.append(f"{key}: {_first_line(e)}")
    if problems:
        fail(ConfigError(problems))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


_STARTED = False  # set once the composed config is ours: later exits are the job's own


def run(main: typing.Callable[[], None], schema: type) -> None:
    """A job's entry point: pre-checks, then Hydra's main. Hydra reports its own
    composition errors with exit code 1; they are input errors, so they exit 2 like
    tidal's validation."""
    precheck_overrides(schema, sys.argv[1:])
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _STARTED:
            sys.exit(2)
        raise


@contextlib.contextmanager
def reported(run_dir: str):
    """Failures once a job has started: one clear line on stderr (exit 2 for refused
    input, 3 for a run that stopped itself, 1 otherwise); the traceback goes to
    ``<run_dir>/error.log``."""
    from tidal.data import DataError
    from tidal.train.lease import LeaseHeld
    from tidal.train.launch import RunStopped
    from tidal.train.publish import ExportRefused
    from tidal.train.resources import ResourcesUnavailable

    try:
        yield
    except (ConfigError, LeaseHeld, ExportRefused, DataError,
            ResourcesUnavailable) as e:  # refused input: the message says what and where
        fail_line(e, 2)
    except RunStopped as e:  # the run stopped itself (divergence, a repeating failure)
        fail_line(e, 3)
    except Exception as e:  # noqa: BLE001 - reported, with the traceback kept
        text = str(e)
        if isinstance(e, ValueError) and ("run.allow_changes" in text or "run.resume_from" in text):
            fail_line(e, 2)  # resuming with a config that changes the checkpoint's meaning
        log = _error_log(run_dir, e)
        print(f"error: {type(e).__name__}: {_first_line(e)}\n(full traceback in {log})", file=sys.stderr)
        sys.exit(1)


def _error_log(run_dir: str, err: BaseException) -> str:
    path = os.path.join(os.getcwd(), "tidal-error.log")  # cloud run dirs: here instead
    if "://" not in run_dir:
        try:
            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, "error.log")
        except OSError:
            pass
    with open(path, "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
        f.write("".join(traceback.format_exception(err)))
    return path


def run_dir(config) -> str:
    """A training job's local run directory (where error.log goes)."""
    return os.path.join(os.path.abspath(os.path.expanduser(config.run.output_dir)), config.run.name)


def revalidate(config, validate):
    """Validate again after a job filled in a default (e.g. the model it found)."""
    try:
        return validate(config)
    except ConfigError as err:
        fail(err)


def fail(err: ConfigError) -> typing.NoReturn:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def fail_line(err: BaseException, code: int = 2) -> typing.NoReturn:
    """Refused input found after composition (a file, a checkpoint, a held run): the
    message alone, no traceback."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(code)


def build(cfg: DictConfig, schema: type, validate) -> typing.Any:
    """Composed Hydra config -> frozen dataclasses, validated; exits 2 on bad input."""
    global _STARTED
    _STARTED = True
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as e:  # noqa: BLE001 - interpolation and missing-value errors
        key = getattr(e, "full_key", None)
        fail(ConfigError([f"{key or 'config'}: {_first_line(e)}"]))
    try:
        return validate(from_dict(schema, data))
    except ConfigError as err:
        fail(err)
