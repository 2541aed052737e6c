"""Optimizers, built from ``OptimConfig`` through a small registry.

Every entry works on FSDP2's sharded (DTensor) parameters: its state tensors are DTensors
sharded like the parameters (Adafactor's column factor is replicated: see :class:`Adafactor`),
so DCP checkpoints and reshards them with the model. ``STATE_BYTES`` says how many bytes of
optimizer state each entry keeps per parameter (the run card states it).
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from tidal.config.schema import OptimConfig
from tidal.registry import Registry

OPTIMIZERS = Registry("optimizer")
# name -> bytes of optimizer state for one fp32 parameter tensor of the given (global) shape
STATE_BYTES: Dict[str, Callable[[Sequence[int]], float]] = {}
CUDA_ONLY = {"adamw8bit"}  # entries that run only on CUDA devices
AO_BLOCK = 256  # torchao's AdamW8bit quantises its two moments in blocks of this many values


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and other 1-D parameters get no weight decay."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), the update
    rule of lucidrains/lion-pytorch. Per step, with gradient ``g`` and momentum ``m``:

        p <- p * (1 - lr * weight_decay)                  (decoupled weight decay)
        p <- p - lr * sign(beta1 * m + (1 - beta1) * g)   (the interpolation's sign)
        m <- beta2 * m + (1 - beta2) * g

    One state tensor per parameter (4 bytes per fp32 parameter, half of AdamW's), created
    with ``zeros_like`` so that under FSDP2 it is a DTensor sharded like its parameter; every
    operation is element-wise, so a sharded step equals the unsharded one exactly. Every
    update element is +-lr: Lion wants a learning rate 3-10x below AdamW's and a weight
    decay 3-10x above it (the paper's advice), and the paper's betas are (0.9, 0.99)."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"Lion: lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lion: betas must be two values in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, grad = state["exp_avg"], p.grad
                if wd:
                    p.mul_(1 - lr * wd)
                update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
        return loss


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


@OPTIMIZERS.register("adamw")
def adamw(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


STATE_BYTES["adamw"] = lambda shape: 8.0 * _numel(shape)  # exp_avg + exp_avg_sq, fp32


@OPTIMIZERS.register("sgd")
def sgd(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                           momentum=cfg.betas[0])


STATE_BYTES["sgd"] = lambda shape: 4.0 * _numel(shape)  # momentum_buffer (optim.betas[0] > 0)


@OPTIMIZERS.register("lion")
def lion(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """``optim.betas`` as given (the schema's [0.9, 0.95] unless set; the ``optim=lion``
    preset sets the paper's [0.9, 0.99]); ``optim.eps`` is unused (sign needs none)."""
    return Lion(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))


STATE_BYTES["lion"] = lambda shape: 4.0 * _numel(shape)  # exp_avg, fp32


class Adafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` whose step also runs on FSDP2's sharded (DTensor) parameters.

    torch's own step does not: on a parameter sharded by rows (``Shard(0)``) its column
    mean (a norm over dim -2) is a pending cross-rank reduction that it squares in place,
    which DTensor refuses, and the parameter and update norms it reads with ``.item()`` are
    such reductions too. This is the same algorithm (``_single_tensor_adafactor``, torch
    2.13) with each cross-rank reduction made whole before use: the row factor is sharded
    like the rows, the column factor is replicated (a ``cols``-long vector per rank), the
    norms are all-reduced. On plain tensors it equals torch's step bit for bit; sharded, it
    equals the unsharded step up to the summation order of those reductions."""

    def _init_group(self, group, params_with_grad, grads, row_vars, col_vars, variances,
                    state_steps) -> bool:
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p) or p.grad.is_sparse:
                raise RuntimeError("Adafactor does not support complex parameters or sparse gradients")
            params_with_grad.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                if p.grad.dim() > 1:
                    state["row_var"] = _factor_zeros(p.grad, -1)  # [..., rows, 1]
                    state["col_var"] = _factor_zeros(p.grad, -2)  # [..., 1, cols]
                else:
                    state["variance"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            row_vars.append(state.get("row_var"))
            col_vars.append(state.get("col_var"))
            variances.append(state.get("variance"))
            state_steps.append(state["step"])
        return False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["maximize"]:
                raise RuntimeError("tidal's Adafactor does not maximize")
            params, grads, rows, cols, variances, steps = [], [], [], [], [], []
            self._init_group(group, params, grads, rows, cols, variances, steps)
            eps1, eps2 = group["eps"]
            for p, g, r, c, v, t in zip(params, grads, rows, cols, variances, steps):
                _adafactor_param(p, g, r, c, v, t, lr=float(group["lr"]), d=group["d"],
                                 beta2_decay=group["beta2_decay"], weight_decay=group["weight_decay"],
                                 eps1=eps1, eps2=eps2)
        return loss


def _factor_zeros(grad: torch.Tensor, reduced: int) -> torch.Tensor:
    """Zeros shaped like ``grad`` with dim ``reduced`` of size 1; for a DTensor, sharded like
    it except along ``reduced`` (replicated there). No communication: every rank makes its
    own local zeros."""
    shape = list(grad.shape)
    shape[reduced] = 1
    if not isinstance(grad, DTensor):
        return grad.new_zeros(shape)
    dim = reduced % grad.ndim
    placements = [Replicate() if isinstance(pl, Shard) and pl.dim % grad.ndim == dim else pl
                  for pl in grad.placements]
    full = torch.zeros(shape, dtype=grad.dtype, device=grad.to_local().device)
    return distribute_tensor(full, grad.device_mesh, placements, src_data_rank=None)


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` laid out as ``ref`` (a pending cross-rank reduction made whole); plain as is."""
    if isinstance(t, DTensor) and tuple(t.placements) != tuple(ref.placements):
        return t.redistribute(ref.device_mesh, ref.placements)
    return t


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's value as one replicated tensor on every rank (reductions done)."""
    if isinstance(t, DTensor):
        return t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim)
    return t


def _item(t: torch.Tensor) -> float:
    return (t.full_tensor() if isinstance(t, DTensor) else t).item()


def _adafactor_param(param, grad, row_var, col_var, variance, step_t, *, lr: float, d: float,
                     beta2_decay: float, weight_decay: float, eps1, eps2: float) -> None:
    """One parameter's Adafactor step: torch 2.13's ``_single_tensor_adafactor`` body, with
    the cross-rank reductions of a DTensor made whole (``_like``, ``_whole``, ``_item``)."""
    if eps1 is None:
        eps1 = torch.finfo(param.dtype).eps
    step_t += 1
    step_float = step_t.item()
    one_minus_beta2_t = step_float ** beta2_decay
    rho_t = min(lr, 1 / (step_float ** 0.5))
    alpha = max(eps2, _item(param.norm(2)) / (param.numel() ** 0.5)) * rho_t
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    if grad.dim() > 1:
        row_mean = _like(torch.norm(grad, dim=-1, keepdim=True), row_var).square_().div_(grad.size(-1))
        row_var.lerp_(row_mean, one_minus_beta2_t)
        col_mean = _like(torch.norm(grad, dim=-2, keepdim=True), col_var).square_().div_(grad.size(-2))
        col_var.lerp_(col_mean, one_minus_beta2_t)
        var_estimate = row_var @ col_var
        var_estimate.div_(_whole(row_var.mean(dim=-2, keepdim=True)).clamp_(min=eps1))
    else:
        variance.lerp_(grad * grad, one_minus_beta2_t)
        var_estimate = variance.clone()
    update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()
    update.mul_(grad)
    denom = max(1.0, _item(update.norm(2)) / ((update.numel() ** 0.5) * d))
    param.add_(update, alpha=-alpha / denom)


@OPTIMIZERS.register("adafactor")
def adafactor(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """Adafactor (Shazeer & Stern 2018, torch's variant: no first moment): ``optim.lr`` is
    its *relative* step (an update's scale is ``max(1e-3, RMS(param)) * min(lr,
    1/sqrt(step))``), decoupled weight decay ``lr * weight_decay``, torch's defaults for the
    rest (beta2 decay -0.8, eps (dtype eps, 1e-3), update clipping d=1); ``optim.betas`` and
    ``optim.eps`` are unused. A matrix keeps a row and a column second-moment factor, a
    vector a full one. See :class:`Adafactor` for FSDP2."""
    return Adafactor(param_groups(model, cfg.weight_decay), lr=cfg.lr)


def _adafactor_bytes(shape: Sequence[int]) -> float:
    if len(shape) < 2:
        return 4.0 * _numel(shape)  # variance
    lead = _numel(shape[:-2])
    return 4.0 * lead * (shape[-2] + shape[-1])  # row_var [.., rows, 1] + col_var [.., 1, cols]


STATE_BYTES["adafactor"] = _adafactor_bytes


_AO_CLASS = []  # torchao's AdamW8bit, with tidal's lr hand-over, made once


def _torchao_adamw8bit():
    """torchao's 8-bit AdamW (``torchao.optim``; older releases kept it in
    ``torchao.prototype.low_bit_optim``), subclassed so that the float learning rate the
    engine sets on each param group every step is handed over as the tensor torchao's
    compiled step insists on (it raises "lr was changed to a non-Tensor object")."""
    if not _AO_CLASS:
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            from torchao.prototype.low_bit_optim import AdamW8bit

        class TidalAdamW8bit(AdamW8bit):
            @torch.no_grad()
            def step(self, closure=None):
                for group in self.param_groups:
                    if not torch.is_tensor(group["lr"]):
                        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
                return super().step(closure)

        TidalAdamW8bit.__name__ = TidalAdamW8bit.__qualname__ = "AdamW8bit"
        _AO_CLASS.append(TidalAdamW8bit)
    return _AO_CLASS[0]


@OPTIMIZERS.register("adamw8bit")
def adamw8bit(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """torchao's ``AdamW8bit``: both moments block-wise quantised to 8 bits (blocks of 256,
    one fp32 scale each; tensors under 4096 values keep fp32 moments), about 2 bytes per
    parameter instead of 8. CUDA only: validation refuses it where no GPU will run it
    (``unavailable``), and this says why on a worker that has none."""
    if device_type != "cuda":
        raise RuntimeError(f"optim.name: 'adamw8bit' runs only on CUDA GPUs, and this worker's "
                           f"device is {device_type}; allowed here: {', '.join(available(False))}")
    try:
        cls = _torchao_adamw8bit()
    except ImportError as e:
        raise RuntimeError("optim.name: 'adamw8bit' needs torchao on every GPU worker "
                           f"(pip install torchao): {e}") from None
    return cls(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
               block_size=AO_BLOCK)


def _adamw8bit_bytes(shape: Sequence[int]) -> float:
    n = _numel(shape)
    if n >= 4096 and n % AO_BLOCK == 0:  # torchao's rule (for the unsharded shape)
        return (2.0 + 2 * 4.0 / AO_BLOCK) * n  # two int8 moments, one fp32 scale per block each
    return 8.0 * n


STATE_BYTES["adamw8bit"] = _adamw8bit_bytes


def available(cuda: bool) -> List[str]:
    """The registered optimizers a run can use on CUDA workers (``cuda``) or on CPU ones."""
    return sorted(n for n in OPTIMIZERS if cuda or n not in CUDA_ONLY)


def unavailable(name: str, use_gpu: Optional[bool] = None) -> Optional[str]:
    """Why optimizer ``name`` (registered) cannot run here, or None. ``use_gpu``:
    ``scaling.use_gpu`` (None: GPUs where there are). Known from this process when the run
    is local (no ``RAY_ADDRESS``) or CPU-only by config; on a remote cluster the workers'
    devices are not visible from here and the worker itself says why at build time."""
    if name not in CUDA_ONLY:
        return None
    cuda_here = torch.cuda.is_available()
    if use_gpu is False or (not cuda_here and not os.environ.get("RAY_ADDRESS")):
        why = "scaling.use_gpu=false" if use_gpu is False else "this machine has no CUDA device"
        return (f"'{name}' runs only on CUDA GPUs ({why}); allowed here: "
                f"{', '.join(available(False))}")
    if cuda_here and name == "adamw8bit" and importlib.util.find_spec("torchao") is None:
        return f"'{name}' needs torchao (pip install torchao), which is not installed"
    return None


def state_bytes_per_param(params: Iterable[torch.nn.Parameter], name: str) -> Optional[float]:
    """Optimizer-state bytes per trainable parameter for ``name``, from the parameters'
    global shapes (a DTensor's ``shape`` is the unsharded one) and each entry's formula
    (fp32 state; step counters and per-group scalars left out)."""
    fn = STATE_BYTES.get(name)
    shapes = [tuple(p.shape) for p in params if p.requires_grad]
    total = sum(_numel(s) for s in shapes)
    if fn is None or not total:
        return None
    return sum(fn(s) for s in shapes) / total


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str):
    return OPTIMIZERS.get_or_raise(cfg.name)(model, cfg, device_type)
