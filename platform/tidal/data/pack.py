"""Packing token streams into fixed-length samples and writing them as .npy shards.

A sample holds ``seq_len + 1`` tokens (inputs are ``[:-1]``, labels ``[1:]``); consecutive
samples overlap by one token, so no token of the stream is lost as a label. Documents are
joined with EOS between them.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from tidal.data import io as tio


class ShardWriter:
    """Accumulates token ids and writes ``<split>_<index>.npy`` shards of packed samples."""

    def __init__(self, out_dir: str, split: str, seq_len: int, shard_samples: int, dtype):
        self.out_dir, self.split, self.seq_len = out_dir, split, seq_len
        self.shard_samples, self.dtype = shard_samples, dtype
        self._buf: List[np.ndarray] = []
        self._buffered = 0
        self._pending: List[np.ndarray] = []  # complete samples not yet written
        self.shards: List[Dict] = []
        self.documents = 0
        self.tokens_in = 0
        self.bytes_in = 0
        self._sbuf: List[np.ndarray] = []  # per-token document scores, beside _buf
        self.scores: List[float] = []  # one per packed sample, in output order

    def add(self, ids, eos: int, nbytes: int = 0, score: float = 0.0) -> None:
        """Append a document (and EOS); ``score`` is its curriculum difficulty."""
        arr = np.empty(len(ids) + 1, dtype=np.int64)
        arr[:-1] = ids
        arr[-1] = eos
        self._sbuf.append(np.full(len(arr), score, dtype=np.float32))
        self.documents += 1
        self.bytes_in += nbytes
        self.tokens_in += len(arr)
        self._buf.append(arr)
        self._buffered += len(arr)
        self._cut()

    def _cut(self) -> None:
        width = self.seq_len + 1
        if self._buffered < width:
            return
        stream = np.concatenate(self._buf)
        sstream = np.concatenate(self._sbuf)
        n = (len(stream) - 1) // self.seq_len
        if n == 0:
            return
        idx = np.arange(n)[:, None] * self.seq_len + np.arange(width)[None, :]
        self._pending.append(stream[idx].astype(self.dtype))
        self.scores.extend(sstream[idx].mean(axis=1).tolist())  # token-weighted
        rest = stream[n * self.seq_len:]
        self._buf, self._buffered = [rest], len(rest)
        self._sbuf = [sstream[n * self.seq_len:]]
        while sum(len(p) for p in self._pending) >= self.shard_samples:
            self._flush(self.shard_samples)

    def _flush(self, count: int) -> None:
        allp = np.concatenate(self._pending)
        out, rest = allp[:count], allp[count:]
        self._pending = [rest] if len(rest) else []
        name = f"{self.split}_{len(self.shards):05d}.npy"
        digest = tio.save_npy(tio.join(self.out_dir, name), out)
        self.shards.append({"file": name, "samples": int(len(out)), "sha256": digest})

    def pending_samples(self) -> np.ndarray:
        return np.concatenate(self._pending) if self._pending else \
            np.zeros((0, self.seq_len + 1), dtype=self.dtype)

    def take_pending(self, count: int) -> np.ndarray:
        """Remove and return the last ``count`` not-yet-written samples."""
        allp = self.pending_samples()
        taken, keep = allp[len(allp) - count:], allp[: len(allp) - count]
        self._pending = [keep] if len(keep) else []
        del self.scores[len(self.scores) - count:]
        return taken

    def add_samples(self, samples: np.ndarray) -> None:
        if len(samples):
            self._pending.append(samples.astype(self.dtype))
            self.scores.extend([0.0] * len(samples))

    def close(self) -> Dict:
        leftover = self._buffered
        pending = sum(len(p) for p in self._pending)
        if pending:
            self._flush(pending)
        return {"documents": self.documents, "tokens": self.tokens_in, "bytes": self.bytes_in,
                "samples": sum(s["samples"] for s in self.shards),
                "tokens_dropped_tail": int(max(leftover - 1, 0)), "shards": self.shards}
