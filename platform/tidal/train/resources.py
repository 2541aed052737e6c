"""The Ray runtime a job runs on: joining or starting it, ending a started one with the
driver (SIGINT, SIGTERM, and through a watcher process even SIGKILL), and making sure
the cluster can ever hold the run before Ray Train is asked to place it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Dict, Optional

from tidal.config.schema import worker_bounds

_REAPER: Optional[subprocess.Popen] = None


class ResourcesUnavailable(RuntimeError):
    """The cluster cannot (or did not in time) offer what the run asks for."""


def started_locally() -> bool:
    """Whether this process started the Ray runtime it uses (no cluster, no autoscaler)."""
    return _REAPER is not None or os.environ.get("TIDAL_LOCAL_RAY") == "1"


def init_ray(service_cpus: float = 0) -> None:
    """Join ``RAY_ADDRESS`` when set (a cluster, or a ``ray job submit`` job), else start a
    local runtime that ends with this driver, however the driver ends. A local runtime
    offers this machine's cores plus ``service_cpus`` logical CPUs for a stage's
    long-lived actors (an RL run's rollout engines and reward actors take turns with the
    learners on a laptop's cores); the workers themselves must fit the real cores."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = None
    if os.environ.get("TIDAL_SHIP_CODE"):  # tidal is not installed on the cluster: ship it
        import tidal

        runtime_env = {"py_modules": [os.path.dirname(tidal.__file__)]}
    address = os.environ.get("RAY_ADDRESS") or None
    cpus = None if address or service_cpus <= 0 else (os.cpu_count() or 1) + int(-(-service_cpus // 1))
    ray.init(address=address, log_to_driver=True, logging_level="WARNING", runtime_env=runtime_env,
             num_cpus=cpus)
    if address is None:
        _watch_local_runtime()


def _watch_local_runtime() -> None:
    """SIGTERM ends the driver like Ctrl-C does (``ray.shutdown`` runs at exit), and a
    watcher process ends the runtime if the driver is killed outright."""
    global _REAPER
    import ray

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    node = ray._private.worker._global_node
    pids = [p.process.pid for procs in node.all_processes.values() for p in procs if p.process]
    if not pids:  # ray.init joined a runtime someone else started (`ray start`): not ours to end
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    _REAPER = subprocess.Popen([sys.executable, "-m", "tidal.train.reaper", *map(str, pids)],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env, start_new_session=True)


def _ask(cfg, use_gpu: bool) -> Dict[str, float]:
    return {"CPU": float(cfg.scaling.cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}


def _describe(lo: int, bundle: Dict[str, float], total: Dict, free: Dict) -> str:
    need = ", ".join(f"{lo * v:g} {k}" for k, v in bundle.items())
    have = ", ".join(f"{total.get(k, 0):g} {k} ({free.get(k, 0):g} free)" for k in bundle)
    return f"the run asks for {lo} worker(s) x {bundle} = {need}; the cluster has {have}"


def _largest_node() -> Dict[str, float]:
    import ray

    best: Dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for k, v in node.get("Resources", {}).items():
                best[k] = max(best.get(k, 0.0), v)
    return best


def ensure_placeable(cfg, use_gpu: bool, log=print) -> None:
    """Fail with a clear message, within ``scaling.start_timeout_s``, when the cluster does
    not offer the run's minimum workers (each worker on one node); a local runtime that can
    never hold them fails at once. Ray Train itself would wait forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    lo, _ = worker_bounds(cfg.scaling.workers)
    bundle = _ask(cfg, use_gpu)
    total, free, node = ray.cluster_resources(), ray.available_resources(), _largest_node()
    fix = ("lower scaling.workers or scaling.cpus_per_worker" +
           (", set scaling.use_gpu=false" if use_gpu else "") + ", or add nodes")
    never = any(total.get(k, 0) < lo * v or node.get(k, 0) < v for k, v in bundle.items())
    if never and (started_locally() or cfg.scaling.start_timeout_s == 0):
        raise ResourcesUnavailable(f"{_describe(lo, bundle, total, free)} (at most "
                                   f"{', '.join(f'{node.get(k, 0):g} {k}' for k in bundle)} on one "
                                   f"node), and no autoscaler can add more: {fix}")
    timeout = cfg.scaling.start_timeout_s
    pg = placement_group([dict(bundle) for _ in range(lo)], strategy="PACK")
    try:
        ready = pg.wait(timeout_seconds=min(timeout, 5) or 5)  # placeable now: a moment
        if not ready and timeout > 5:
            log(f"waiting up to {timeout:g}s (scaling.start_timeout_s) for the cluster to offer "
                f"{lo} worker(s) of {bundle}")
            ready = pg.wait(timeout_seconds=timeout - 5)
    finally:
        remove_placement_group(pg)
    if not ready:
        total, free = ray.cluster_resources(), ray.available_resources()
        raise ResourcesUnavailable(f"{_describe(lo, bundle, total, free)}; they were not offered "
                                   f"within scaling.start_timeout_s={timeout:g}s: {fix}")
