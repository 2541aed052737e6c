"""Divergence guards: catch a bad step before its update is applied.

Every step's global loss and gradient norm (identical on all ranks) are checked before the
optimizer step: a non-finite value, a loss above ``loss_spike_factor`` x the running median
of recent healthy losses, or a gradient norm above ``grad_spike_factor`` x its running
median (gradient spikes tend to precede loss spikes) is an anomaly. The loop then rolls
back to the last committed checkpoint and skips the window of batches that led to the
anomaly (PaLM's remedy), and stops with a report after ``max_rollbacks``.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Deque, Optional


class DivergenceGuard:
    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.losses: Deque[float] = deque(maxlen=cfg.window)
        self.grads: Deque[float] = deque(maxlen=cfg.window)

    def check(self, loss: float, grad_norm: float) -> Optional[str]:
        """The anomaly in this step, or None (then the step joins the running history)."""
        c = self.cfg
        if not c.enabled:
            return None
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        if len(self.losses) >= c.min_history:
            med = statistics.median(self.losses)
            # a ratio to the median means something only for a positive loss (not a policy loss)
            if c.loss_spike_factor > 0 and med > 0 and loss > c.loss_spike_factor * med:
                return f"loss spike: {loss:.4g} > {c.loss_spike_factor:g} x running median {med:.4g}"
            gmed = statistics.median(self.grads)
            if c.grad_spike_factor > 0 and gmed > 0 and grad_norm > c.grad_spike_factor * gmed:
                return (f"gradient-norm spike: {grad_norm:.4g} > {c.grad_spike_factor:g} x running "
                        f"median {gmed:.4g}")
        self.losses.append(loss)
        self.grads.append(grad_norm)
        return None

    def reset(self) -> None:
        """After a rollback the history restarts (the replayed steps refill it)."""
        self.losses.clear()
        self.grads.clear()
