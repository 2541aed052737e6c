"""The training engine: model + optimizer + schedule + step, shared by every stage.

``build_engine`` makes the state, ``train_step`` runs one optimizer step over this rank's
micro-batches of a global batch, ``evaluate`` computes validation loss. A stage (pretraining
now; SFT, reward modelling, DPO, PPO learners later) is an objective plus a data source on
this same engine.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch

from tidal.config.schema import ModelConfig, OptimConfig, ScalingConfig, ScheduleConfig, TrainConfig
from tidal.models import build_model, count_params, shape_of
from tidal.objectives import LMObjective
from tidal.objectives.batch import Batch
from tidal.optim import build_optimizer, lr_at
from tidal.parallel import apply as apply_fsdp
from tidal.parallel import collectives as C
from tidal.parallel import make_mesh, resolve_precision
from tidal.train import metrics as M
from tidal.train.dynamics import Dynamics



@dataclass(frozen=True)
class EngineSpec:
    """What one engine is built from: its model, optimizer and schedule, how it is sharded
    (scaling), the step's shape (train) and the sequence length. A job config can hold
    several (a policy and, later, a value model), each with its own sections."""
    model: ModelConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    scaling: ScalingConfig
    train: TrainConfig
    seq_len: int

    @classmethod
    def of(cls, cfg) -> "EngineSpec":
        """The spec of a stage config's (single) model."""
        return cls(cfg.model, cfg.optim, cfg.schedule, cfg.scaling, cfg.train, cfg.data.seq_len)


@dataclass
class Engine:
    spec: EngineSpec
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int
    world: int
    global_batch: int  # samples per optimizer step, across all ranks
    num_params: int
    flops_per_token: float
    peak_flops: Optional[float]
    shape: Dict  # num_layers, hidden_size, ... (tidal.models.shape_of)
    precision: str  # resolved: fp32 or bf16
    lora: bool
    trainable_names: List[str]  # the tensors a LoRA checkpoint holds, fixed at build
    trainable_params: int
    objective: object = field(default_factory=LMObjective)  # see tidal.objectives
    step: int = 0
    tokens_seen: int = 0
    # engines trained beside this one in the same workers (PPO's value model, by name):
    # checkpointed, restored and resharded with it
    companions: Dict[str, "Engine"] = field(default_factory=dict)
    dynamics: Optional[Dynamics] = None  # train.dynamics_every > 0: measured every N steps

    @property
    def grad_accum(self) -> int:
        return -(-(self.global_batch // self.world) // self.spec.train.micro_batch_size)


def set_determinism(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_engine(spec: Union[EngineSpec, object], vocab_size: int, eos_id: int, pad_id: Optional[int],
                 rank: int, world: int, device: torch.device, head: str = "lm") -> Engine:
    """The sharded model, optimizer and counters of ``spec`` (an :class:`EngineSpec`, or a
    stage config, whose spec is taken)."""
    cfg = spec if isinstance(spec, EngineSpec) else EngineSpec.of(spec)
    from tidal.models import kernels, materialize

    set_determinism(cfg.train.seed, cfg.train.deterministic)
    fused_loss = kernels.apply(cfg.model, device)  # model.kernels=liger: patched before building
    meta = materialize.eligible(cfg.model, head, vocab_size)  # each rank allocates only its shards
    if meta:
        model = materialize.build_meta(cfg.model, vocab_size, eos_id, pad_id)
    else:
        model = build_model(cfg.model, vocab_size, eos_id, pad_id, cfg.train.seed, head=head)
    num_params = count_params(model)
    flop_params = M.matmul_params(model)
    shape = shape_of(model)
    lora_cfg = cfg.model.lora
    if lora_cfg.rank:
        from tidal.models import lora

        model = lora.wrap(model, lora_cfg, head, getattr(model, "tidal_new_tokens", []),
                          cfg.model.pretrained)
    if fused_loss:
        model.tidal_fused_loss = "liger"  # model_nll_sum's fused linear cross-entropy
    if not meta:
        model.to(device)
    precision = resolve_precision(cfg.scaling.precision, device.type)
    mesh = make_mesh(device.type, world)
    apply_fsdp(model, mesh, precision, cfg.scaling.activation_checkpointing, cfg.train.compile)
    if meta:
        materialize.materialize_(model, device, cfg.model, cfg.train.seed)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    dynamics = Dynamics(model, cfg.train.dynamics_every, world, device) if cfg.train.dynamics_every else None
    seq = cfg.seq_len
    peak = M.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return Engine(spec=cfg, model=model, optimizer=optimizer, device=device, rank=rank, world=world,
                  global_batch=cfg.train.global_batch_tokens // seq, num_params=num_params,
                  flops_per_token=M.flops_per_token(flop_params, shape["num_layers"],
                                                    shape["hidden_size"], seq),
                  peak_flops=peak, shape=shape, precision=precision, lora=bool(lora_cfg.rank),
                  trainable_names=sorted(n for n, p in model.named_parameters() if p.requires_grad),
                  trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  dynamics=dynamics)


def _sums(loss_sum, weight, tokens, stats, device: torch.device) -> torch.Tensor:
    """``[loss_sum, weight, real tokens, stat sum, stat count, ...]`` (stats by name) as one
    float64 vector: what one all-reduce per step adds up over ranks."""
    values = [loss_sum, weight, tokens] + [x for k in sorted(stats) for x in stats[k]]
    return torch.stack([torch.as_tensor(v, device=device).detach().to(torch.float64).reshape(())
                        for v in values])


def _means(total: torch.Tensor, keys, prefix: str = "") -> Dict[str, float]:
    values = total.tolist()
    return {f"{prefix}{k}": values[3 + 2 * i] / values[4 + 2 * i] if values[4 + 2 * i] else 0.0
            for i, k in enumerate(keys)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scale_and_clip(model: torch.nn.Module, scale: float, clip: float,
                    dyn: Optional[Dynamics] = None) -> torch.Tensor:
    """Gradients times ``scale`` (FSDP averaged them over ranks: ``world / global weight``
    makes them the gradient of the global mean loss), then clipped to norm ``clip`` (0: no
    clipping); returns the norm before clipping (``dyn`` takes the groups' norms there)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, scale)
    if dyn is not None:
        dyn.take_grads()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train_step(engine: Engine, micro_batches: List[Batch],
               guard: Optional[Callable[[float, float], Optional[str]]] = None,
               loss_scale: float = 1.0) -> Dict[str, float]:
    """One optimizer step over this rank's micro-batches of a global batch.

    The objective returns loss *sums* and their weights (tokens, pairs, ...); each
    micro-batch's sum is back-propagated as is, the weights and statistics of every
    micro-batch and rank are added up in one all-reduce, and the gradients (which FSDP
    averaged over ranks) are scaled by ``world / global weight`` before clipping. So the
    update is the gradient of the global mean loss, whatever the world size or micro-batch
    grouping. ``guard`` sees the global loss and gradient norm before the update: when it
    names an anomaly the update is not applied and the result carries ``anomaly`` (the
    step counter does not move). ``loss_scale`` is for fault drills (NaN, spikes)."""
    t0 = time.perf_counter()
    cfg, model, opt = engine.spec, engine.model, engine.optimizer
    lr = lr_at(engine.step, cfg.train.max_steps, cfg.optim.lr, cfg.schedule)
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    n = len(micro_batches)
    dyn = engine.dynamics if engine.dynamics is not None and engine.dynamics.due(engine.step + 1) else None
    with dyn.timing_comm() if dyn is not None else contextlib.nullcontext():
        total, keys = _accumulate(engine, micro_batches, loss_scale)
    total = C.all_sum(total, engine.world)
    weight = total[1].item()
    grad_norm = _scale_and_clip(model, engine.world / weight if weight > 0 else 0.0, cfg.optim.grad_clip, dyn)
    loss_value = total[0].item() / weight if weight > 0 else 0.0
    # an all-padding global batch (weight 0) has nothing to learn from: no update, no guard
    verdict = guard(loss_value, float(grad_norm)) if guard is not None and weight > 0 else None
    if verdict is not None:
        opt.zero_grad(set_to_none=True)
        return {"step": engine.step + 1, "anomaly": verdict, "loss": loss_value,
                "grad_norm": float(grad_norm), "lr": lr, **_means(total, keys)}
    if weight > 0:
        if dyn is not None:
            dyn.snapshot()
        opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(engine.device)
    dt = time.perf_counter() - t0
    tokens = int(total[2].item())  # real tokens: no padding, both sides of a pair
    engine.step += 1
    engine.tokens_seen += tokens
    tps_device = tokens / dt / engine.world
    out = {"step": engine.step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
           "step_time_s": dt, "tokens_per_s": tokens / dt, "tokens_per_s_per_worker": tps_device,
           "tokens_seen": engine.tokens_seen, "peak_mem_gib": M.peak_memory_gib(engine.device),
           "world_size": engine.world, "grad_accum": n, "time": time.time(), **_means(total, keys)}
    # a frozen reference's forward pass (DPO) is a third of a training step's FLOPs per token
    refs = getattr(engine.objective, "reference_forwards", 0)
    util = M.mfu(tps_device, engine.flops_per_token * (1 + refs / 3), engine.peak_flops)
    if util is not None:
        out["mfu"] = util
    if dyn is not None and weight > 0:
        out.update(dyn.report(dt))
    return out


def _accumulate(engine: Engine, micro_batches: List[Batch], loss_scale: float):
    """Forward and backward over this rank's micro-batches (FSDP reduce-scatters the
    gradients after the last); returns the summed ``_sums`` vector and the stat keys."""
    model, n = engine.model, len(micro_batches)
    total, keys = None, ()
    for i, batch in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter once per step
            model.set_requires_gradient_sync(i == n - 1)
        loss_sum, weight, stats = engine.objective.loss(model, batch)
        if loss_scale != 1.0:
            loss_sum = loss_sum * loss_scale
        loss_sum.backward()
        part = _sums(loss_sum, weight, batch["tokens"], stats, engine.device)
        total, keys = (part if total is None else total + part), sorted(stats)
    return total, keys


@torch.no_grad()
def evaluate(engine: Engine, batches: Iterable[Batch], num_batches: int,
             bytes_per_token: Optional[float], blank: Callable[[], Batch]) -> Dict[str, float]:
    """Validation loss and statistics over a fixed sample set, reduced like training's
    (sums and weights, one all-reduce). Every rank runs ``num_batches`` forwards (FSDP
    all-gathers are collective), repeating a batch with zero weight where it ran out, or
    ``blank()`` when it has no validation samples at all."""
    model = engine.model
    model.eval()
    total, keys = None, ()
    it = iter(batches)
    last = None
    for _ in range(num_batches):
        batch = next(it, None)
        factor = 1.0 if batch is not None else 0.0
        batch = batch if batch is not None else (last if last is not None else blank())
        last = batch
        loss_sum, weight, stats = engine.objective.loss(model, batch)
        part = _sums(loss_sum, weight, batch["tokens"], stats, engine.device) * factor
        total, keys = (part if total is None else total + part), sorted(stats)
    if total is None:
        return {}
    total = C.all_sum(total, engine.world)
    weight = total[1].item()
    val_loss = total[0].item() / weight if weight > 0 else 0.0
    out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), **_means(total, keys, "val_")}
    if bytes_per_token:
        out["val_bpb"] = val_loss / math.log(2) / bytes_per_token
    return out
