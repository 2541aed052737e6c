"""Fault injection for drills and tests: ``train.inject_faults`` entries ``kind@step`` or
``kind@step:rank``.

- ``kill@S[:R]``         the worker of rank R (default 0) SIGKILLs itself after step S,
                         before anything else happens (its checkpoint at S is not written);
- ``kill_in_save@S[:R]`` it SIGKILLs itself in the middle of the save at step S: its shard
                         is uploaded but the checkpoint is never committed;
- ``crash@S[:R]``        like ``kill``, but on every attempt (a bug or a bad batch at step S:
                         the run must stop itself instead of retrying forever);
- ``nan@S``              step S's loss becomes NaN (so do its gradients);
- ``spike@S``            step S's loss is multiplied by 50 (a loss and gradient spike);
- ``kill_engine@S``      RL: a rollout engine's process SIGKILLs itself while it generates
                         iteration S (the learners regenerate the iteration on a restart);
- ``kill_reward@S``      RL: a reward-model actor is killed before it scores iteration S
                         (its batch is re-scored on a replacement);
- ``stall_sync@S``       RL: a rollout engine hangs in the weight sync after iteration S
                         (past ``rollout.sync_timeout_s``: the sync is retried on a new engine).

Each fault except ``crash`` fires once per run: a marker under ``<run storage>/faults/`` is written before
it fires, so the recovered run does not meet it again. Nothing fires unless configured.
"""
from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from typing import List, Optional

from tidal.data import io as tio

KINDS = ("kill", "kill_in_save", "crash", "nan", "spike", "kill_engine", "kill_reward", "stall_sync")
SPEC = re.compile(r"^(?P<kind>[a-z_]+)@(?P<step>\d+)(?::(?P<rank>\d+))?$")
SPIKE_SCALE = 50.0


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int
    spec: str


def parse(specs: List[str]) -> List[Fault]:
    out = []
    for s in specs:
        m = SPEC.match(s.strip())
        if not m or m.group("kind") not in KINDS:
            raise ValueError(f"train.inject_faults: {s!r} is not kind@step[:rank] with kind in "
                             f"{', '.join(KINDS)}")
        out.append(Fault(m.group("kind"), int(m.group("step")), int(m.group("rank") or 0), s.strip()))
    return out


class Injector:
    def __init__(self, specs: List[str], run_dir: Optional[str], rank: int) -> None:
        self.faults = [f for f in parse(specs) if f.kind in ("nan", "spike") or f.rank == rank]
        self.run_dir = run_dir
        self.rank = rank

    def _fire_once(self, f: Fault) -> bool:
        marker = self._marker(f)
        if tio.exists(marker):
            return False
        tio.write_bytes(marker, b"fired\n")
        return True

    def _due(self, kind: str, step: int) -> Optional[Fault]:
        for f in self.faults:
            if f.kind == kind and f.step == step:
                return f
        return None

    def loss_scale(self, step: int) -> float:
        """Multiplier for step ``step``'s loss: 1, NaN or a spike (same on every rank)."""
        for kind, scale in (("nan", float("nan")), ("spike", SPIKE_SCALE)):
            f = self._due(kind, step)
            if f is not None and not tio.exists(self._marker(f)):
                return scale
        return 1.0

    def _marker(self, f: Fault) -> str:
        return tio.join(self.run_dir or ".", "faults", re.sub(r"[^\w@.-]", "_", f.spec))

    def fired(self, kind: str, step: int) -> None:
        """Mark a loss fault as used (rank 0, once the step's verdict is in)."""
        f = self._due(kind, step)
        if f is not None and self.rank == 0:
            tio.write_bytes(self._marker(f), b"fired\n")

    def once(self, kind: str, step: int) -> bool:
        """Whether the fault ``kind`` is due at ``step`` and has not fired yet (marking it
        fired): for faults that the loop carries out on something else (an engine, an actor)."""
        f = self._due(kind, step)
        return f is not None and self._fire_once(f)

    def maybe_kill(self, kind: str, step: int) -> None:
        f = self._due(kind, step)
        if f is not None and self._fire_once(f):
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "kill" and self._due("crash", step) is not None:
            os.kill(os.getpid(), signal.SIGKILL)
