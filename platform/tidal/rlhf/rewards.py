"""Rewards for RL: a weighted sum of parts, scored in the RL driver.

A reward (``tidal.config.RLRewardConfig``, the ``reward`` section) has up to three kinds
of part, each weighted:

- ``model``: a reward-model export scored by Ray actors (``tidal.rlhf.reward_model``);
  it scores ``sequences``, the prompt + completion token ids;
- ``rules``: built-in rule rewards from :data:`RULES` (``exact_match``, ``prefix_match``,
  ``format``, ``length``), each ``fn(prompts, completions, metadata, completion_ids, cfg)``;
- ``functions``: user functions by import path, ``"package.module:function"``, called in
  the driver as::

      def my_reward(prompts, completions, metadata, completion_ids=None):
          return [1.0 if "yes" in c else 0.0 for c in completions]

  ``prompts`` and ``completions`` are lists of strings (the prompt as rendered for the
  policy, the sampled completion as decoded), ``metadata`` a list of dicts (the prompt
  record's other fields, e.g. ``answer``); the function returns one float per completion.
  ``completion_ids`` (lists of token ids) is passed only when the function has a
  parameter of that name (or ``**kwargs``).

A part that raises, returns the wrong number of values, or returns a non-finite value has
failed. ``on_error="drop"``: a part that raises (or miscounts) on the batch is called again
sample by sample to find the samples it fails on; those samples are dropped (total 0, they
must not train) and counted per part in :attr:`RewardResult.errors`. ``on_error="stop"``:
:class:`RewardError` naming the part and the first error. A reward model that does not
answer (a deadline, an actor that died twice) raises :class:`RewardError` whatever
``on_error`` says: that is not a property of the samples.

:func:`check_reward_config` checks a reward spec (names, imports, weight counts, the
regex) before any Ray work, with messages that name the key.
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence

import numpy as np

from tidal.registry import Registry

RULES = Registry("rule reward")


class RewardError(RuntimeError):
    """A reward could not be computed (a part failed with ``on_error="stop"``, or the
    reward model did not answer)."""


class RewardModel(Protocol):
    """What scores the ``model`` part: token-id sequences in, one float each out
    (``tidal.rlhf.reward_model.RewardModelPool``)."""

    def score(self, sequences: Sequence[Sequence[int]]) -> np.ndarray: ...


# ----------------------------------------------------------------------------- rules


def _answer(meta, cfg) -> Optional[str]:
    if not isinstance(meta, dict) or meta.get(cfg.answer_field) is None:
        return None
    return str(meta[cfg.answer_field])


def _math_equal(completion: str, gold: str) -> bool:
    from math_verify import parse, verify

    # math-verify bounds its work with SIGALRM, which only the main thread may set
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(gold, parsing_timeout=limit)
    if not gold_parsed:
        return False
    return bool(verify(gold_parsed, parse(completion, parsing_timeout=limit), timeout_seconds=limit))


@RULES.register("exact_match")
def exact_match(prompts, completions, metadata, completion_ids, cfg) -> List[float]:
    """1.0 when the completion's answer equals ``metadata[answer_field]``: mathematically
    (math-verify: ``1/2`` = ``0.5``, ``\\boxed{2}`` = ``2``) or as the same stripped string;
    else 0.0 (also for a record without the field)."""
    out = []
    for completion, meta in zip(completions, metadata):
        gold = _answer(meta, cfg)
        if gold is None:
            out.append(0.0)
        elif completion.strip() == gold.strip():
            out.append(1.0)
        else:
            out.append(1.0 if _math_equal(completion, gold) else 0.0)
    return out


@RULES.register("prefix_match")
def prefix_match(prompts, completions, metadata, completion_ids, cfg) -> List[float]:
    """Dense: the share of the answer's characters that the completion (leading whitespace
    stripped) reproduces as a prefix, in [0, 1] (0.0 without an answer)."""
    out = []
    for completion, meta in zip(completions, metadata):
        gold = _answer(meta, cfg)
        if not gold:
            out.append(0.0)
            continue
        text, k = completion.lstrip(), 0
        while k < min(len(text), len(gold)) and text[k] == gold[k]:
            k += 1
        out.append(k / len(gold))
    return out


@RULES.register("format")
def format_match(prompts, completions, metadata, completion_ids, cfg) -> List[float]:
    """1.0 when ``re.search(format_pattern, completion)`` matches, else 0.0."""
    pattern = re.compile(cfg.format_pattern)
    return [1.0 if pattern.search(c) else 0.0 for c in completions]


@RULES.register("length")
def length(prompts, completions, metadata, completion_ids, cfg) -> List[float]:
    """``-|tokens - length_target| / length_target``: 0 at the target, negative around it."""
    t = cfg.length_target
    return [-abs(len(ids) - t) / t for ids in completion_ids]


# ----------------------------------------------------------------------------- user functions


def load_function(spec: str) -> Callable:
    """The callable at ``"package.module:function"`` (``"module:Class.method"`` too)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError("expected 'module:function'")
    module, attr = spec.split(":")
    if not module or not attr:
        raise ValueError("expected 'module:function'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{attr} is a {type(obj).__name__}, not a function")
    return obj


def _takes_ids(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "completion_ids" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _weights(key: str, names: List[str], weights: List[float], p: List[str]) -> None:
    if weights and len(weights) != len(names):
        p.append(f"reward.{key}_weights: {len(weights)} weight(s) for {len(names)} {key}(s) "
                 f"(give one per entry of reward.{key}s, or none for 1.0 each)")
    for i, w in enumerate(weights or []):
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            p.append(f"reward.{key}_weights[{i}]: {w!r} is not a finite number")


def check_reward_config(cfg) -> List[str]:
    """Problems with a reward spec (an ``RLRewardConfig``), each naming its key; empty when
    it is usable. Imports the user functions (nothing else runs); the model path itself is
    the stage validation's to check."""
    p: List[str] = []
    if not cfg.model and not cfg.rules and not cfg.functions:
        p.append("reward: no parts: set reward.model (a reward-model export or 'auto'), "
                 "reward.rules or reward.functions")
    if cfg.model:
        if not (isinstance(cfg.model_weight, (int, float)) and math.isfinite(cfg.model_weight)):
            p.append(f"reward.model_weight: {cfg.model_weight!r} is not a finite number")
        if cfg.model_actors < 1:
            p.append(f"reward.model_actors: {cfg.model_actors} (need at least 1)")
        if cfg.model_batch_size < 1:
            p.append(f"reward.model_batch_size: {cfg.model_batch_size} (need at least 1)")
    seen = set()
    for i, name in enumerate(cfg.rules):
        if name not in RULES:
            p.append(f"reward.rules[{i}]: unknown rule {name!r}; allowed: {', '.join(sorted(RULES))}")
        elif name in seen:
            p.append(f"reward.rules[{i}]: {name!r} is listed twice (weight it instead)")
        seen.add(name)
    _weights("rule", cfg.rules, cfg.rule_weights, p)
    if "format" in cfg.rules:
        try:
            re.compile(cfg.format_pattern)
        except (re.error, TypeError) as e:
            p.append(f"reward.format_pattern: {cfg.format_pattern!r} is not a valid regular expression: {e}")
    if "length" in cfg.rules and not (isinstance(cfg.length_target, int) and cfg.length_target > 0):
        p.append(f"reward.length_target: {cfg.length_target!r} (need a positive number of tokens)")
    seen = set()
    for i, spec in enumerate(cfg.functions):
        try:
            load_function(spec)
        except Exception as e:  # noqa: BLE001 - whatever the import raises, named for the user
            p.append(f"reward.functions[{i}]: cannot import {spec!r}: {type(e).__name__}: {e}")
        if spec in seen:
            p.append(f"reward.functions[{i}]: {spec!r} is listed twice (weight it instead)")
        seen.add(spec)
    _weights("function", cfg.functions, cfg.function_weights, p)
    if cfg.on_error not in ("drop", "stop"):
        p.append(f"reward.on_error: {cfg.on_error!r}; allowed: drop, stop")
    if not (isinstance(cfg.timeout_s, (int, float)) and cfg.timeout_s > 0):
        p.append(f"reward.timeout_s: {cfg.timeout_s!r} (need a positive number of seconds)")
    return p


# ----------------------------------------------------------------------------- scoring


@dataclass
class RewardResult:
    """Scores of N samples: ``total`` (the weighted sum; 0 where dropped), each part's
    unweighted values (0 where that part failed), the dropped samples (they must not
    train), and the failed samples counted per part."""

    total: np.ndarray
    parts: Dict[str, np.ndarray]
    dropped: np.ndarray
    errors: Dict[str, int] = field(default_factory=dict)

    def metrics(self, prefix: str = "reward") -> Dict[str, float]:
        """Means over the kept samples (``reward``, ``reward/<part>``), and counts of
        dropped samples and of failures per part."""
        keep = ~self.dropped
        mean = (lambda a: float(a[keep].mean())) if keep.any() else (lambda a: 0.0)
        out = {prefix: mean(self.total), f"{prefix}/dropped": int(self.dropped.sum())}
        for name, values in self.parts.items():
            out[f"{prefix}/{name}"] = mean(values)
        for name, n in self.errors.items():
            out[f"{prefix}/errors/{name}"] = n
        return out


class _Failed(Exception):
    pass


def _values(out, n: int) -> np.ndarray:
    """A part's output as float64 ``[n]``; :class:`_Failed` when it is not n numbers."""
    try:
        arr = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise _Failed(f"returned something that is not a list of numbers: {e}") from e
    if arr.shape != (n,):
        got = arr.shape[0] if arr.ndim == 1 else f"shape {arr.shape}"
        raise _Failed(f"returned {got} values for {n} samples")
    return arr


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, _Failed) else f"{type(e).__name__}: {e}"


@dataclass
class _Part:
    name: str
    weight: float
    call: Callable  # (prompts, completions, metadata, completion_ids, sequences) -> values


class RewardScorer:
    """Scores completions with the parts of ``cfg`` (an ``RLRewardConfig``); the model
    part through ``model_pool`` (anything with ``score(sequences) -> array``), which must be
    given when ``cfg.model`` is set. User functions are imported here."""

    def __init__(self, cfg, model_pool: Optional[RewardModel] = None):
        self.cfg = cfg
        self.parts: List[_Part] = []
        if cfg.model and model_pool is None:
            raise ValueError("reward.model is set: a reward-model pool is needed to score it")
        if model_pool is not None:
            self.parts.append(_Part("model", float(cfg.model_weight),
                                    lambda p, c, m, ids, seqs: model_pool.score(seqs)))
        rule_w = cfg.rule_weights or [1.0] * len(cfg.rules)
        for name, w in zip(cfg.rules, rule_w):
            rule = RULES.get_or_raise(name)
            self.parts.append(_Part(name, float(w), lambda p, c, m, ids, seqs, rule=rule: rule(p, c, m, ids, cfg)))
        fn_w = cfg.function_weights or [1.0] * len(cfg.functions)
        for spec, w in zip(cfg.functions, fn_w):
            fn = load_function(spec)
            if _takes_ids(fn):
                call = lambda p, c, m, ids, seqs, fn=fn: fn(p, c, m, completion_ids=ids)  # noqa: E731
            else:
                call = lambda p, c, m, ids, seqs, fn=fn: fn(p, c, m)  # noqa: E731
            self.parts.append(_Part(spec, float(w), call))
        if not self.parts:
            raise ValueError("reward: no parts to score with (reward.model, reward.rules, reward.functions)")

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              completion_ids: Sequence[Sequence[int]], metadata: Sequence[Optional[Dict]],
              sequences: Optional[Sequence[Sequence[int]]] = None) -> RewardResult:
        n = len(completions)
        for what, xs in (("prompts", prompts), ("completion_ids", completion_ids), ("metadata", metadata)):
            if len(xs) != n:
                raise ValueError(f"{len(xs)} {what} for {n} completions")
        if any(p.name == "model" for p in self.parts) and (sequences is None or len(sequences) != n):
            raise ValueError(f"the reward model scores sequences: {n} needed, "
                             f"{'none' if sequences is None else len(sequences)} given")
        inputs = (list(prompts), list(completions), [m if m is not None else {} for m in metadata],
                  [list(x) for x in completion_ids], None if sequences is None else list(sequences))
        total = np.zeros(n, dtype=np.float64)
        dropped = np.zeros(n, dtype=bool)
        parts: Dict[str, np.ndarray] = {}
        errors: Dict[str, int] = {}
        for part in self.parts:
            values, failed = self._run(part, inputs, n)
            if failed.any():
                errors[part.name] = int(failed.sum())
                dropped |= failed
            parts[part.name] = values
            total += part.weight * values
        total[dropped] = 0.0
        return RewardResult(total=total, parts=parts, dropped=dropped, errors=errors)

    def _call(self, part: _Part, inputs, idx: Optional[List[int]], n: int) -> np.ndarray:
        if idx is not None:
            inputs = tuple(None if xs is None else [xs[i] for i in idx] for xs in inputs)
        return _values(part.call(*inputs), n)

    def _run(self, part: _Part, inputs, n: int):
        """The part's values (0 where it failed) and the samples it failed on."""
        stop = self.cfg.on_error == "stop"
        failed = np.zeros(n, dtype=bool)
        try:
            values = self._call(part, inputs, None, n)
        except RewardError:
            raise  # the reward model did not answer: not a property of the samples
        except Exception as e:  # noqa: BLE001 - a user's reward may raise anything
            if stop:
                raise RewardError(f"reward part '{part.name}' failed: {_describe(e)}") from e
            values = np.zeros(n, dtype=np.float64)
            for i in range(n):  # sample by sample: find the ones it fails on
                try:
                    values[i] = self._call(part, inputs, [i], 1)[0]
                except RewardError:
                    raise
                except Exception:  # noqa: BLE001
                    failed[i] = True
        bad = ~np.isfinite(values)
        if bad.any():
            if stop:
                i = int(np.flatnonzero(bad)[0])
                raise RewardError(f"reward part '{part.name}' failed: sample {i} got {values[i]} "
                                  "(not a finite number)")
            failed |= bad
        values = np.where(failed, 0.0, values)
        return values, failed
