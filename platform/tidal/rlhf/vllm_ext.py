"""The vLLM worker extension through which learners push weights into a rollout engine.

vLLM mixes this class into each of its workers (``LLM(worker_extension_cls=...)``); the
engine actor calls its methods by name with ``LLM.collective_rpc``. Weights arrive in
checkpoint (HF) format and go through the model runner's ``reload_weights``, which maps
q/k/v and gate/up into vLLM's packed layers and re-runs the post-load processing. (Calling
``model.load_weights`` after start-up breaks the CPU backend, which re-packs the linear
weights after loading and empties the originals.)

Kept free of tidal imports: vLLM imports it by path inside its own processes.
"""
from __future__ import annotations

from typing import List


class WeightSyncExtension:
    def tidal_load_weights(self, names: List[str], tensors: list) -> int:
        """Apply a full set of named tensors in one reload; returns how many."""
        self.model_runner.reload_weights(weights_iterator=iter(zip(names, tensors)),
                                         is_checkpoint_format=True)
        return len(names)
