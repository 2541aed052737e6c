"""The training engine: model + optimizer + schedule + step, shared by every stage.

``build_engine`` makes the state, ``train_step`` runs one optimizer step over this rank's
micro-batches of a global batch, ``evaluate`` computes validation loss. A stage (pretraining
now; SFT, reward modelling, DPO, PPO learners later) is an objective plus a data source on
this same engine.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from tidal.config.schema import PretrainConfig
from tidal.models import build_model, count_params, shape_of
from tidal.objectives import LMObjective
from tidal.optim import build_optimizer, lr_at
from tidal.parallel import apply as apply_fsdp
from tidal.parallel import make_mesh, resolve_precision
from tidal.train import metrics as M



@dataclass
class Engine:
    cfg: PretrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int
    world: int
    global_batch: int  # samples per optimizer step, across all ranks
    num_params: int
    flops_per_token: float
    peak_flops: Optional[float]
    objective: object = field(default_factory=LMObjective)  # see tidal.objectives
    step: int = 0
    cursor: int = 0  # global samples consumed
    tokens_seen: int = 0
    extra: Dict = field(default_factory=dict)

    @property
    def grad_accum(self) -> int:
        return -(-(self.global_batch // self.world) // self.cfg.train.micro_batch_size)


def set_determinism(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_engine(cfg: PretrainConfig, vocab_size: int, eos_id: int, pad_id: Optional[int],
                 rank: int, world: int, device: torch.device, head: str = "lm") -> Engine:
    set_determinism(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg.model, vocab_size, eos_id, pad_id, cfg.train.seed, head=head)
    num_params = count_params(model)
    flop_params = M.matmul_params(model)
    shape = shape_of(model)
    lora_cfg = cfg.model.lora
    if lora_cfg.rank:
        from tidal.models import lora

        model = lora.wrap(model, lora_cfg, head, getattr(model, "tidal_new_tokens", []),
                          cfg.model.pretrained)
    model.to(device)
    precision = resolve_precision(cfg.scaling.precision, device.type)
    mesh = make_mesh(device.type, world)
    apply_fsdp(model, mesh, precision, cfg.scaling.activation_checkpointing)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    seq = cfg.data.seq_len
    peak = M.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return Engine(cfg=cfg, model=model, optimizer=optimizer, device=device, rank=rank, world=world,
                  global_batch=cfg.train.global_batch_tokens // seq, num_params=num_params,
                  flops_per_token=M.flops_per_token(flop_params, shape["num_layers"],
                                                    shape["hidden_size"], seq),
                  peak_flops=peak, extra={"shape": shape, "precision": precision,
                                          "lora": bool(lora_cfg.rank),
                                          # the tensors a LoRA checkpoint holds, fixed at build
                                          "trainable_names": sorted(n for n, p in model.named_parameters()
                                                                    if p.requires_grad),
                                          "trainable_params": sum(p.numel() for p in model.parameters()
                                                                  if p.requires_grad)})


def _global_mean(value: torch.Tensor, world: int) -> float:
    t = value.detach().float().reshape(1).clone()
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / world


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(engine: Engine, micro_batches: List[np.ndarray],
               guard: Optional[Callable[[float, float], Optional[str]]] = None,
               loss_scale: float = 1.0) -> Dict[str, float]:
    """One optimizer step over this rank's share of a global batch. ``guard`` sees the
    global loss and gradient norm before the update: when it names an anomaly the update
    is not applied and the result carries ``anomaly`` (the step counters do not move).
    ``loss_scale`` is for fault drills (NaN, spikes)."""
    t0 = time.perf_counter()
    cfg, model, opt = engine.cfg, engine.model, engine.optimizer
    lr = lr_at(engine.step, cfg.train.max_steps, cfg.optim.lr, cfg.schedule)
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    n = len(micro_batches)
    share = sum(len(mb) for mb in micro_batches)
    even = all(len(mb) == len(micro_batches[0]) for mb in micro_batches)
    loss_sum = torch.zeros((), device=engine.device)
    for i, mb in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter once per step
            model.set_requires_gradient_sync(i == n - 1)
        tokens = torch.from_numpy(mb).to(engine.device, non_blocking=True)
        loss = engine.objective(model, tokens)
        if loss_scale != 1.0:
            loss = loss * loss_scale
        # each sample weighs the same whatever the split (an elastic world size can leave a
        # shorter last micro-batch)
        loss = loss / n if even else loss * (len(mb) / share)
        loss.backward()
        loss_sum += loss.detach()
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    loss_value = _global_mean(loss_sum, engine.world)
    stats = getattr(engine.objective, "take_stats", None)
    train_stats = stats() if stats is not None else {}
    for k, v in train_stats.items():  # e.g. pair accuracy: the mean over ranks
        train_stats[k] = _global_mean(torch.tensor(v, device=engine.device), engine.world)
    verdict = guard(loss_value, float(grad_norm)) if guard is not None else None
    if verdict is not None:
        opt.zero_grad(set_to_none=True)
        return {"step": engine.step + 1, "anomaly": verdict, "loss": loss_value,
                "grad_norm": float(grad_norm), "lr": lr}
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(engine.device)
    dt = time.perf_counter() - t0
    tokens = engine.global_batch * cfg.data.seq_len
    engine.step += 1
    engine.cursor += engine.global_batch
    engine.tokens_seen += tokens
    tps_device = tokens / dt / engine.world
    out = {"step": engine.step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
           "step_time_s": dt, "tokens_per_s": tokens / dt, "tokens_per_s_per_worker": tps_device,
           "tokens_seen": engine.tokens_seen, "peak_mem_gib": M.peak_memory_gib(engine.device),
           "world_size": engine.world, "grad_accum": n, "time": time.time(), **train_stats}
    util = M.mfu(tps_device, engine.flops_per_token, engine.peak_flops)
    if util is not None:
        out["mfu"] = util
    return out


@torch.no_grad()
def evaluate(engine: Engine, batches: Iterable[np.ndarray], num_batches: int,
             bytes_per_token: Optional[float]) -> Dict[str, float]:
    """Validation loss over a fixed sample set; every rank runs ``num_batches`` forwards
    (FSDP all-gathers are collective), padding with zero-weight batches where it ran out."""
    model = engine.model
    model.eval()
    keys = tuple(getattr(engine.objective, "eval_keys", ()))
    totals = torch.zeros(2 + len(keys), dtype=torch.float64, device=engine.device)  # loss, count, extras
    it = iter(batches)
    last = None
    for _ in range(num_batches):
        mb = next(it, None)
        weight = 1.0 if mb is not None else 0.0
        mb = mb if mb is not None else last
        if mb is None:  # this rank has no validation samples at all
            mb = np.zeros((1, *engine.extra.get("sample_shape", [engine.cfg.data.seq_len + 1])),
                          dtype=np.int64)
        last = mb
        loss, count, *extra = engine.objective.eval_sums(model, torch.from_numpy(mb).to(engine.device))
        sums = extra[0] if extra else {}
        totals += torch.tensor([float(loss) * weight, count * weight]
                               + [sums[k] * weight for k in keys], dtype=torch.float64,
                               device=engine.device)
    if engine.world > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    val_loss = (totals[0] / totals[1].clamp(min=1)).item()
    out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
    for i, k in enumerate(keys):
        out[f"val_{k}"] = (totals[2 + i] / totals[1].clamp(min=1)).item()
    if bytes_per_token:
        out["val_bpb"] = val_loss / math.log(2) / bytes_per_token
    return out
