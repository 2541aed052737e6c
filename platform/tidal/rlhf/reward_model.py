"""The reward model as Ray actors: a ``jobs/reward.py`` export scored on CPU in fp32.

The export is an ``AutoModelForSequenceClassification`` directory with one label
(``tidal.train.export``), loaded with the evaluator's loader (``tidal.evaluate.load``).
A sequence's score is what :class:`tidal.objectives.preference.RewardObjective` trains:
the model's scalar at the sequence's last token, rows right-padded with the model's pad
id (as pair data is), so padding never changes a score.

:class:`RewardModelActor` holds one copy (``ray.remote(RewardModelActor)``);
:class:`RewardModelPool` splits the sequences over its actors and waits with a deadline:
:class:`RewardTimeout` past it; an actor that died is replaced by a fresh one and its share
scored again, once (then :class:`~tidal.rlhf.rewards.RewardError`). An error raised inside
an actor for its inputs (e.g. a token id outside the vocabulary) comes back as the original
exception type, so the scorer can isolate the samples that caused it.
"""
from __future__ import annotations

import os
import time
from typing import List, Sequence

import numpy as np

from tidal.rlhf.rewards import RewardError


class RewardTimeout(RewardError):
    """The reward model gave no answer within ``reward.timeout_s``."""


class RewardModelActor:
    """One reward model (a Ray actor: ``ray.remote(RewardModelActor)``), in-process:
    the export at ``path`` loaded once, fp32 on CPU, scoring in batches of ``batch_size``."""

    def __init__(self, path: str, batch_size: int, threads: int = 1):
        import torch

        from tidal.data import io as tio
        from tidal.evaluate import load
        from tidal.train.publish import check_readable

        torch.set_num_threads(max(1, int(threads)))
        local = tio.local_dir(os.path.expanduser(path))
        bad = check_readable(local)
        if bad:
            raise RewardError(f"reward model '{path}' is not a complete export: {'; '.join(bad[:3])}")
        self.model, _ = load(local, reward=True)
        if getattr(self.model.config, "num_labels", 1) != 1:
            raise RewardError(f"reward model '{path}' has {self.model.config.num_labels} labels, not 1")
        self.batch_size = max(1, int(batch_size))
        self.pad_id = self.model.config.pad_token_id
        self.vocab = self.model.get_input_embeddings().num_embeddings

    def ready(self) -> bool:
        return True

    def score(self, sequences: Sequence[Sequence[int]]) -> List[float]:
        """One score per token-id sequence."""
        import torch

        seqs = [list(map(int, s)) for s in sequences]
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"sequence {i} is empty")
            if min(s) < 0 or max(s) >= self.vocab:
                raise ValueError(f"sequence {i} has token ids outside the vocabulary [0, {self.vocab})")
        out = np.zeros(len(seqs), dtype=np.float64)
        # similar lengths together: less padding (which changes no score)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        # without a pad id the model pools the last position: one sequence per forward
        step = self.batch_size if self.pad_id is not None else 1
        with torch.no_grad():
            for start in range(0, len(order), step):
                idx = order[start:start + step]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), self.pad_id if self.pad_id is not None else 0,
                                 dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                r = self.model(input_ids=ids).logits.squeeze(-1).float()
                out[idx] = r.numpy()
        return out.tolist()


class RewardModelPool:
    """``actors`` reward-model actors (``cpus`` each) on the export at ``path``;
    :meth:`score` splits the work over them and waits at most ``timeout_s``."""

    def __init__(self, path: str, actors: int, batch_size: int, timeout_s: float, cpus: int = 1):
        import ray

        self.path, self.batch_size, self.timeout_s, self.cpus = path, batch_size, timeout_s, cpus
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
               "TOKENIZERS_PARALLELISM": "false"}
        self._cls = ray.remote(RewardModelActor).options(num_cpus=cpus, runtime_env={"env_vars": env})
        self.replaced = 0  # actors replaced after they died
        self.actors: List = []
        from ray.exceptions import RayActorError

        try:
            self.actors = [self._start() for _ in range(max(1, int(actors)))]
            self._get([a.ready.remote() for a in self.actors], time.monotonic() + timeout_s,
                      f"starting {len(self.actors)} reward model actor(s)")
        except RayActorError as e:  # the model did not load
            self.shutdown()
            raise RewardError(f"starting reward model actors on '{path}': {e}") from e
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def from_config(cls, cfg, path: str, cpus: int = 1) -> "RewardModelPool":
        """The pool an ``RLRewardConfig`` asks for, on the export at ``path`` (``cfg.model``
        resolved: "auto" is the caller's to turn into a path)."""
        return cls(path, cfg.model_actors, cfg.model_batch_size, cfg.timeout_s, cpus)

    def _start(self):
        return self._cls.remote(self.path, self.batch_size, self.cpus)

    def _get(self, refs, deadline: float, what: str):
        """``ray.get`` within the deadline; a timeout is :class:`RewardTimeout`, an error
        inside the actor is re-raised as its own type; :class:`RayActorError` passes."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError as e:
            raise RewardTimeout(f"{what}: no answer within {self.timeout_s:.0f} s "
                                "(reward.timeout_s)") from e
        except RayActorError:
            raise
        except RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, RewardError):
                raise RewardError(f"{what}: {e.cause}") from e
            raise cause from e

    def score(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """One float64 score per sequence, in order."""
        from ray.exceptions import RayActorError

        n = len(sequences)
        if n == 0:
            return np.zeros(0, dtype=np.float64)
        deadline = time.monotonic() + self.timeout_s
        shares = [s for s in np.array_split(np.arange(n), min(len(self.actors), n)) if len(s)]
        work = [[list(sequences[i]) for i in share] for share in shares]
        refs = [self.actors[k].score.remote(w) for k, w in enumerate(work)]
        out = np.zeros(n, dtype=np.float64)
        for k, (share, ref) in enumerate(zip(shares, refs)):
            what = f"reward model actor {k}: scoring {len(share)} sequence(s)"
            try:
                values = self._get(ref, deadline, what)
            except RayActorError as e:
                values = self._rescore(k, work[k], deadline, what, e)
            out[share] = np.asarray(values, dtype=np.float64)
        return out

    def _rescore(self, k: int, work, deadline: float, what: str, first: Exception):
        """Actor ``k`` died: start a new one in its place and score its share there, once."""
        import ray
        from ray.exceptions import RayActorError

        try:
            ray.kill(self.actors[k], no_restart=True)
        except Exception:  # noqa: BLE001 - it is gone already
            pass
        self.actors[k] = self._start()
        self.replaced += 1
        # the new actor gets a deadline of its own: loading the model takes time
        deadline = max(deadline, time.monotonic() + self.timeout_s)
        try:
            return self._get(self.actors[k].score.remote(work), deadline, what + " (again, on a new actor)")
        except RayActorError as e:
            raise RewardError(f"{what}: the actor died ({type(first).__name__}), and so did its "
                              f"replacement ({type(e).__name__})") from e

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
