"""Batch sources: where a stage's micro-batches come from.

The engine counts optimizer steps; the position in the data belongs to the source, which
is checkpointed as its own named state (``trainer_state.json`` ``states.source``). The
shard loop reads prepared shards through :class:`ShardSource`; the RL learner's source is
a queue of rollout batches with the same small interface::

    batches(rank, world, micro) -> list of micro-batches (this rank's share of the step)
    advance()                   -> the step was applied: move past its batch
    skip_failed(before)         -> after a rollback restored an older state: move past the
                                   batches since, up to and including the failed step's
                                   (``before``: the state when it failed); says what it skipped
    state_dict() / load_state_dict(state)
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Protocol

import numpy as np

from tidal.data.loader import GlobalSampleLoader
from tidal.objectives.batch import Batch


class BatchSource(Protocol):
    name: str

    def batches(self, rank: int, world: int, micro: int) -> List[Batch]: ...

    def advance(self) -> None: ...

    def skip_failed(self, before: Dict) -> Dict: ...

    def state_dict(self) -> Dict: ...

    def load_state_dict(self, state: Dict) -> None: ...


class ShardSource:
    """Prepared shards read by the global sample cursor (``tidal.data.loader``): the same
    samples make up each step whatever the world size. Its state is the cursor (global
    samples consumed) and the windows of samples skipped after a divergence."""

    name = "source"

    def __init__(self, loader: GlobalSampleLoader, make_batch: Callable[[np.ndarray], Batch]):
        self.loader, self.make_batch = loader, make_batch
        self.cursor = 0
        self.skipped: List[List[int]] = []

    @property
    def global_batch(self) -> int:
        return self.loader.global_batch

    def batches(self, rank: int, world: int, micro: int) -> List[Batch]:
        return [self.make_batch(mb) for mb in self.loader.micro_batches(self.cursor, rank, world, micro)]

    def advance(self) -> None:
        self.cursor += self.loader.global_batch

    def skip(self, end: int) -> List[int]:
        """Move the cursor to ``end``, recording the samples passed over."""
        window = [self.cursor, end]
        self.skipped.append(window)
        self.cursor = end
        return window

    def skip_failed(self, before: Dict) -> Dict:
        """Past every sample from the restored cursor through the failed step's batch (the
        skipped windows recorded before the restore are kept)."""
        self.skipped = [list(w) for w in before["skipped"]]
        window = self.skip(before["cursor"] + self.global_batch)
        return {"skipped_samples": window,
                "skipped_batches": (window[1] - window[0]) // self.global_batch}

    def epoch(self) -> float:
        return self.loader.epoch_of(self.cursor)

    def val_batches(self, total: int, rank: int, world: int, micro: int) -> Iterator[Batch]:
        return map(self.make_batch, self.loader.val_batches(total, rank, world, micro))

    def state_dict(self) -> Dict:
        return {"cursor": self.cursor, "skipped": [list(w) for w in self.skipped]}

    def load_state_dict(self, state: Dict) -> None:
        self.cursor = int(state["cursor"])
        self.skipped = [list(w) for w in state.get("skipped", [])]
