"""Learning-rate schedules as pure functions of the step.

Each schedule maps ``(step, total_steps, cfg)`` to a multiplier of the peak LR. The LR is
therefore derived from the step alone: nothing to checkpoint, and a resumed or resized run
sees exactly the LR an uninterrupted one would.
"""
from __future__ import annotations

import math

from tidal.config.schema import ScheduleConfig
from tidal.optim.registry import Registry

SCHEDULES = Registry("schedule")


def _warmup(step: int, cfg: ScheduleConfig) -> float | None:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return None


def _progress(step: int, total: int, start: int) -> float:
    """Fraction of the post-``start`` phase completed at ``step`` (0 .. 1)."""
    span = max(total - start, 1)
    return min(max(step - start, 0) / span, 1.0)


@SCHEDULES.register("constant")
def constant(step: int, total: int, cfg: ScheduleConfig) -> float:
    w = _warmup(step, cfg)
    return 1.0 if w is None else w


@SCHEDULES.register("cosine")
def cosine(step: int, total: int, cfg: ScheduleConfig) -> float:
    w = _warmup(step, cfg)
    if w is not None:
        return w
    p = _progress(step, total - 1, cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


@SCHEDULES.register("linear")
def linear(step: int, total: int, cfg: ScheduleConfig) -> float:
    w = _warmup(step, cfg)
    if w is not None:
        return w
    p = _progress(step, total - 1, cfg.warmup_steps)
    return 1.0 - (1 - cfg.min_lr_ratio) * p


@SCHEDULES.register("wsd")
def warmup_stable_decay(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Warmup, a constant plateau, then a linear cooldown over ``decay_fraction`` of training."""
    w = _warmup(step, cfg)
    if w is not None:
        return w
    decay_start = max(cfg.warmup_steps, total - round(cfg.decay_fraction * total))
    if step < decay_start:
        return 1.0
    p = _progress(step, total - 1, decay_start)
    return 1.0 - (1 - cfg.min_lr_ratio) * p


@SCHEDULES.register("inverse_sqrt")
def inverse_sqrt(step: int, total: int, cfg: ScheduleConfig) -> float:
    w = _warmup(step, cfg)
    if w is not None:
        return w
    return max(math.sqrt(max(cfg.warmup_steps, 1) / (step + 1)), cfg.min_lr_ratio)


@SCHEDULES.register("polynomial")
def polynomial(step: int, total: int, cfg: ScheduleConfig) -> float:
    w = _warmup(step, cfg)
    if w is not None:
        return w
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
    return peak_lr * SCHEDULES.get_or_raise(cfg.name)(step, total, cfg)
