"""Optimizers, built from ``OptimConfig`` through a small registry."""
from __future__ import annotations

import torch

from tidal.config.schema import OptimConfig
from tidal.registry import Registry

OPTIMIZERS = Registry("optimizer")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and other 1-D parameters get no weight decay."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@OPTIMIZERS.register("adamw")
def adamw(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


@OPTIMIZERS.register("sgd")
def sgd(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                           momentum=cfg.betas[0])


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str):
    return OPTIMIZERS.get_or_raise(cfg.name)(model, cfg, device_type)
