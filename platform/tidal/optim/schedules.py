"""Learning-rate schedules as pure functions of the step.

Each schedule maps ``(step, total_steps, cfg)`` to a multiplier of the peak LR. The LR is
therefore derived from the step alone: nothing to checkpoint, and a resumed or resized run
sees exactly the LR an uninterrupted one would.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from tidal.config.schema import ScheduleConfig
from tidal.registry import Registry

SCHEDULES = Registry("schedule")


def _progress(step: int, total: int, start: int) -> float:
    """Fraction of the post-``start`` phase completed at ``step`` (0 .. 1)."""
    span = max(total - start, 1)
    return min(max(step - start, 0) / span, 1.0)


def with_warmup(name: str):
    """Register a schedule that ramps linearly to the peak over ``warmup_steps`` first; the
    decorated function gives the multiplier after the warmup."""

    def deco(after: Callable[[int, int, ScheduleConfig], float]):
        def schedule(step: int, total: int, cfg: ScheduleConfig) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            return after(step, total, cfg)

        schedule.__doc__ = after.__doc__
        return SCHEDULES.register(name)(schedule)

    return deco


@with_warmup("constant")
def constant(step: int, total: int, cfg: ScheduleConfig) -> float:
    return 1.0


@with_warmup("cosine")
def cosine(step: int, total: int, cfg: ScheduleConfig) -> float:
    p = _progress(step, total - 1, cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


@with_warmup("linear")
def linear(step: int, total: int, cfg: ScheduleConfig) -> float:
    return 1.0 - (1 - cfg.min_lr_ratio) * _progress(step, total - 1, cfg.warmup_steps)


@with_warmup("wsd")
def warmup_stable_decay(step: int, total: int, cfg: ScheduleConfig) -> float:
    """A constant plateau, then a linear cooldown over ``decay_fraction`` of training."""
    decay_start = max(cfg.warmup_steps, total - round(cfg.decay_fraction * total))
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - cfg.min_lr_ratio) * _progress(step, total - 1, decay_start)


@with_warmup("inverse_sqrt")
def inverse_sqrt(step: int, total: int, cfg: ScheduleConfig) -> float:
    return max(math.sqrt(max(cfg.warmup_steps, 1) / (step + 1)), cfg.min_lr_ratio)


@with_warmup("polynomial")
def polynomial(step: int, total: int, cfg: ScheduleConfig) -> float:
    p = _progress(step, total - 1, cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - p) ** cfg.power


@SCHEDULES.register("one_cycle")
def one_cycle(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Rise linearly from ``min_lr_ratio`` to the peak over the warmup, then cosine to zero."""
    if step < cfg.warmup_steps:
        p = step / max(cfg.warmup_steps, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * p
    p = _progress(step, total - 1, cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * p))


def lr_at(step: int, total: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if cfg.warmup_fraction is not None:  # warmup as a share of the run
        cfg = replace(cfg, warmup_steps=round(cfg.warmup_fraction * total))
    return peak_lr * SCHEDULES.get_or_raise(cfg.name)(step, total, cfg)
