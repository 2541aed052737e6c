"""Learner -> rollout engines: the weights of the sharded policy, gathered one tensor at a
time and streamed under their Hugging Face names (never a full state dict on one rank).

Every rank walks the FSDP2 parameters in the same order (each ``full_tensor()`` is a
collective); rank 0 hands each gathered tensor to the engine group, which buckets and
sends them (``tidal.rlhf.rollout.EngineGroup.sync``). With LoRA the engines get the merged
weights: a layer's base weight plus ``B @ A * scale``, under the base layer's name.

After a sync the engines' log-probs of a fixed probe sequence are compared with the
learner's: a sync that silently changed nothing (or the wrong tensors) fails here, typed,
instead of training on samples from stale weights.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from tidal.parallel import collectives as C
from tidal.rlhf.rollout import RolloutError, WeightSyncError

PEFT_PREFIX = "base_model.model."


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _lora_scales(model) -> Dict[str, float]:
    """Module name (HF) -> the adapter's scale, for every LoRA layer of a PEFT model."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.scaling:
            out[name.removeprefix(PEFT_PREFIX)] = float(m.scaling["default"])
    return out


def hf_weights(model, rank: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(HF name, full CPU tensor)`` for every weight of ``model`` (merged with LoRA);
    every rank must exhaust it together. Ranks other than 0 yield nothing."""
    scales = _lora_scales(model) if hasattr(model, "peft_config") else {}
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in model.state_dict().items():
        full = _full(value).detach()  # a collective under FSDP2: every rank, same order
        if rank != 0:
            continue
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_A." in name or ".lora_B." in name or name.endswith(".base_layer.weight"):
            module = name.split(".lora_")[0] if ".lora_" in name else name[:-len(".base_layer.weight")]
            part = "A" if ".lora_A." in name else "B" if ".lora_B." in name else "W"
            slot = pending.setdefault(module, {})
            slot[part] = full.to("cpu", torch.float32)
            if len(slot) == 3:  # the layer's base weight and both adapter matrices
                merged = slot["W"] + (slot["B"] @ slot["A"]) * scales[module]
                yield f"{module}.weight", merged.to(full.dtype)
                del pending[module]
            continue
        yield name.replace(".base_layer.", "."), full.to("cpu")
    if pending:
        raise WeightSyncError(f"LoRA layers with missing parts: {sorted(pending)[:3]}")


def push(engine, group, version: int) -> Dict:
    """Stream the policy's weights to every engine as ``version`` (a collective over the
    learner ranks). Rank 0 keeps the gathering going after a failed send so the other
    ranks' collectives complete, then every rank raises the same typed error."""
    weights = hf_weights(engine.model, engine.rank)
    info, error = {}, None
    if engine.rank == 0:
        try:
            info = group.sync(weights, version)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = f"{type(e).__name__}: {e}"
    for _ in weights:  # the rest of the gathering (a no-op when the send finished)
        pass
    error = C.broadcast(error, engine.world)
    if error:
        raise WeightSyncError(f"weight sync to version {version} failed: {error}")
    return info


@torch.no_grad()
def learner_logps(model, ids: List[int], device) -> List[float]:
    """The learner's log-probs of ``ids[1:]`` (a forward pass on every rank)."""
    from tidal.objectives.logprobs import model_token_logprobs, shift_targets

    x = torch.tensor([ids], device=device)
    was = model.training
    model.eval()
    try:
        logp, _ = model_token_logprobs(model, shift_targets(x), input_ids=x, use_cache=False)
    finally:
        model.train(was)
    return logp[0, :-1].float().cpu().tolist()


def check_parity(engine, group, probe: List[int], tol: float, version: int) -> Dict:
    """Every engine's log-probs of ``probe`` against the learner's (mean absolute
    difference at most ``tol``); raises :class:`WeightSyncError` on every rank if not."""
    t0 = time.time()
    mine = learner_logps(engine.model, probe, engine.device)
    verdict: Optional[Dict] = None
    if engine.rank == 0:
        try:
            gaps = [sum(abs(a - b) for a, b in zip(mine, theirs)) / len(mine) for theirs in group.probe(probe)]
            verdict = {"gap": max(gaps)}
            if max(gaps) > tol:
                verdict["error"] = (f"after the sync to version {version}, engine(s) "
                                    f"{[i for i, g in enumerate(gaps) if g > tol]} give log-probs "
                                    f"{max(gaps):.2e} (mean abs) away from the learner's (allowed "
                                    f"{tol:g}, rollout.sync_check_tol): they do not serve the "
                                    "learner's weights")
        except Exception as e:  # noqa: BLE001
            verdict = {"error": f"parity probe failed: {type(e).__name__}: {e}"}
    verdict = C.broadcast(verdict, engine.world)
    if "error" in verdict:
        raise WeightSyncError(verdict["error"])
    return {"sync_parity_gap": verdict["gap"], "sync_check_s": time.time() - t0}


def with_retries(attempt: Callable[[], Dict], group, retries: int, rank: int, world: int,
                 emit: Callable[[Dict], None], step: int) -> Dict:
    """Run ``attempt`` (a collective sync + check that raises :class:`WeightSyncError` on
    every rank) up to ``retries + 1`` times. Between attempts rank 0 restarts the engines
    that are lost, or every engine when none is (one that answers but serves the wrong
    weights is re-created), and the retry is logged; the last failure is raised."""
    for n in range(retries + 1):
        try:
            return {**attempt(), "sync_attempts": n + 1}
        except WeightSyncError as e:
            if n == retries:
                raise
            replaced = None
            if rank == 0:
                alive = group.alive()
                dead = [k for k in range(len(group.actors)) if k not in alive] or list(range(len(group.actors)))
                try:
                    replaced = group.replace(dead)
                except RolloutError as again:
                    replaced = {"_error": f"{e}; restarting the engines failed: {again}"}
            replaced = C.broadcast(replaced, world)
            if "_error" in replaced:
                raise WeightSyncError(replaced["_error"]) from e
            emit({"event": "sync_retry", "step": step, "attempt": n + 1, "reason": str(e), **replaced})
    raise AssertionError("unreachable")
