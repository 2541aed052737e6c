"""Optimizers and learning-rate schedules, each in a small registry."""
from tidal.optim.optimizers import OPTIMIZERS, build_optimizer
from tidal.registry import Registry
from tidal.optim.schedules import SCHEDULES, lr_at

__all__ = ["OPTIMIZERS", "SCHEDULES", "Registry", "build_optimizer", "lr_at"]
