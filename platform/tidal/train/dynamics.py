"""Training dynamics, measured every ``train.dynamics_every`` optimizer steps (0: never).

On those steps the engine reports, beside the loss and the global gradient norm:

- ``grad_norm/<group>``: each layer group's gradient norm (before clipping);
- ``update_ratio`` and ``update_ratio/<group>``: ``||theta_after - theta_before|| / ||theta_before||``
  of the step, globally and per group (the update-to-parameter ratio; ~1e-3 is the usual
  healthy order for AdamW, far above means too high a learning rate);
- ``comm_gather_s`` and ``comm_reduce_s``: seconds the step's thread spent in FSDP2's
  parameter all-gathers and gradient reduce-scatters (the issuing calls and their waits:
  the communication the step was exposed to; work overlapped on another stream is not
  counted), and ``compute_s``, the rest of the step.

Layer groups: ``embed`` (input embeddings), ``blocks.<a>-<b>`` (the decoder blocks in at most
eight contiguous groups) and ``head`` (the final norm and output layer); LoRA adapters
count with their layer. Every rank adds up its own shards' squares and one all-reduce
sums them. The snapshot that the update ratio needs is a copy of this rank's shards, taken
only on the measured steps.
"""
from __future__ import annotations

import contextlib
import re
import time
from typing import Dict, List, Optional

import torch

from tidal.parallel import collectives as C

MAX_GROUPS = 8
# what FSDP2 calls (torch.distributed functions, looked up at call time)
GATHERS = ("all_gather_single", "all_gather_into_tensor")
REDUCES = ("reduce_scatter_single", "reduce_scatter_tensor")
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def layer_groups(names: List[str]) -> List[str]:
    """The group of each parameter name (see the module's docstring)."""
    blocks = [int(m.group(1)) for n in names for m in [_BLOCK.search(n)] if m]
    count = max(blocks) + 1 if blocks else 0
    size = -(-count // MAX_GROUPS) if count else 1
    out = []
    for n in names:
        m = _BLOCK.search(n)
        if m:
            lo = int(m.group(1)) // size * size
            out.append(f"blocks.{lo}-{min(lo + size, count) - 1}")
        elif "embed" in n:
            out.append("embed")
        else:
            out.append("head")
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class Dynamics:
    def __init__(self, model: torch.nn.Module, every: int, world: int, device: torch.device):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        groups = layer_groups([n for n, _ in named])
        self.names = sorted(set(groups), key=lambda g: (g != "embed", g == "head", _first(g)))
        self.index = [self.names.index(g) for g in groups]
        self.every, self.world, self.device = every, world, device
        self.before: Optional[List[torch.Tensor]] = None
        self.grads: Optional[torch.Tensor] = None
        self.comm = {"gather": 0.0, "reduce": 0.0}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def _per_group(self, tensors: List[Optional[torch.Tensor]]) -> torch.Tensor:
        out = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        for k, t in zip(self.index, tensors):
            if t is not None:
                out[k] += _local(t).detach().double().pow(2).sum()
        return out

    def take_grads(self) -> None:
        """The gradients' squares per group (call after they are final, before clipping)."""
        self.grads = self._per_group([p.grad for p in self.params])

    def snapshot(self) -> None:
        self.before = [_local(p).detach().clone() for p in self.params]

    def report(self, step_s: float) -> Dict[str, float]:
        """The step's metrics (collective: every rank calls it on a measured step)."""
        delta = self._per_group([_local(p).detach() - b for p, b in zip(self.params, self.before)])
        norm = self._per_group(self.before)
        total = C.all_sum(torch.cat([self.grads, delta, norm]), self.world).tolist()
        k = len(self.names)
        grads, delta, norm = total[:k], total[k:2 * k], total[2 * k:]
        out = {f"grad_norm/{g}": v ** 0.5 for g, v in zip(self.names, grads)}
        out.update({f"update_ratio/{g}": (d / n) ** 0.5 if n > 0 else 0.0 for g, d, n in zip(self.names, delta, norm)})
        out["update_ratio"] = (sum(delta) / sum(norm)) ** 0.5 if sum(norm) > 0 else 0.0
        out.update(comm_gather_s=self.comm["gather"], comm_reduce_s=self.comm["reduce"],
                   compute_s=max(0.0, step_s - self.comm["gather"] - self.comm["reduce"]))
        self.before, self.grads = None, None
        return out

    @contextlib.contextmanager
    def timing_comm(self):
        """Time FSDP2's collectives while the step runs."""
        self.comm = {"gather": 0.0, "reduce": 0.0}
        import torch.distributed as dist

        kinds = {name: kind for kind, names in (("gather", GATHERS), ("reduce", REDUCES)) for name in names
                 if hasattr(dist, name)}
        originals = {name: getattr(dist, name) for name in kinds}

        def timed(name):
            fn, kind = originals[name], kinds[name]

            def call(*args, **kwargs):
                t0 = time.perf_counter()
                work = fn(*args, **kwargs)
                self.comm[kind] += time.perf_counter() - t0
                if work is not None and hasattr(work, "wait"):
                    return _TimedWork(work, self.comm, kind)
                return work
            return call

        for name in originals:
            setattr(dist, name, timed(name))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


class _TimedWork:
    """An async collective's handle whose ``wait`` is timed too."""

    def __init__(self, work, comm: Dict[str, float], kind: str):
        self.work, self.comm, self.kind = work, comm, kind

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.work.wait(*args, **kwargs)
        finally:
            self.comm[self.kind] += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self.work, name)


def _first(group: str) -> int:
    m = re.match(r"blocks\.(\d+)-", group)
    return int(m.group(1)) if m else 0
