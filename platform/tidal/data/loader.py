"""The global-sample-cursor loader.

The order in which training samples are consumed is a pure function of ``(seed, epoch)``:
a permutation of all sample indices per epoch. Training consumes that sequence one global
batch at a time; a cursor (the number of samples consumed so far) is all the state there
is, and it is saved in every checkpoint. Each rank takes a contiguous slice of every global
batch, so the same samples make up each step whatever the world size, and a run resumed or
resized at step ``k`` continues with exactly the samples an uninterrupted run would see.
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import numpy as np

from tidal.data import io as tio
from tidal.data.curriculum import curriculum_order


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(num_samples)


class ShardSet:
    """Random access to the packed samples of one split across its shard files; a split
    with no shards (a set too small to hold out validation samples) is empty."""

    def __init__(self, data_dir: str, shards: List[Dict]):
        self.arrays = [tio.load_npy(tio.join(data_dir, s["file"])) for s in shards]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, indices: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        rows = [self.arrays[s][i - self.offsets[s]] for s, i in zip(shard, indices)]
        return np.stack(rows).astype(np.int64)


class GlobalSampleLoader:
    def __init__(self, data_dir: str, manifest: Dict, seed: int, global_batch: int):
        self.train = ShardSet(data_dir, manifest["shards"]["train"])
        # shards.val == [] (or absent): no validation split; len(self.val) == 0 and
        # val_batches yields nothing, so callers must skip evaluation, not report 0.0
        self.val = ShardSet(data_dir, manifest["shards"].get("val") or [])
        self.seed, self.global_batch = seed, global_batch
        self._orders: Dict[int, np.ndarray] = {}
        cur = manifest.get("curriculum")
        self.scores = tio.load_npy(tio.join(data_dir, cur["file"])) if cur else None
        self.curriculum_epochs = cur["epochs"] if cur else 0

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if epoch < self.curriculum_epochs:  # easy to hard, still a function of (seed, epoch)
                order = curriculum_order(np.asarray(self.scores), self.seed, epoch)
            else:
                order = epoch_order(len(self.train), self.seed, epoch)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def global_indices(self, cursor: int, count: int) -> np.ndarray:
        """Sample indices ``cursor .. cursor+count`` of the infinite (seed, epoch) sequence."""
        n = len(self.train)
        out = []
        while count > 0:
            epoch, pos = divmod(cursor, n)
            take = min(count, n - pos)
            out.append(self._order(epoch)[pos:pos + take])
            cursor, count = cursor + take, count - take
        return np.concatenate(out)

    def rank_batch(self, cursor: int, rank: int, world: int) -> np.ndarray:
        """This rank's contiguous slice of the global batch starting at ``cursor``."""
        per = self.global_batch // world
        idx = self.global_indices(cursor, self.global_batch)[rank * per:(rank + 1) * per]
        return self.train.take(idx)

    def micro_batches(self, cursor: int, rank: int, world: int, micro: int) -> Iterator[np.ndarray]:
        batch = self.rank_batch(cursor, rank, world)
        for i in range(0, len(batch), micro):
            yield batch[i:i + micro]

    def val_batches(self, total: int, rank: int, world: int, micro: int) -> Iterator[np.ndarray]:
        """The first ``total`` validation samples, dealt round-robin to ranks."""
        idx = np.arange(min(total, len(self.val)))[rank::world]
        for i in range(0, len(idx), micro):
            yield self.val.take(idx[i:i + micro])

    def epoch_of(self, cursor: int) -> float:
        return cursor / len(self.train)
