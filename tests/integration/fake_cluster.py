"""A fake multi-node autoscaling Ray cluster on this one machine, standing in for cloud nodes.

Ray's ``FakeMultiNodeProvider`` (the node provider behind Ray's own autoscaler tests) turns
"launch a node" into "start another raylet on this machine", so the real autoscaler (v1)
adds worker nodes when Ray Train asks for more workers; a node is lost by SIGKILLing its
raylet and every process under it at once, as a machine that vanishes would. Nodes are
separate raylets with their own resources, so Ray Train places, health-checks and loses
workers exactly as on a real multi-node cluster; only the machines are imaginary.

Why not ``ray.cluster_utils.AutoscalingCluster``: in Ray 2.60 its constructor reads
``fake_multi_node/example.yaml`` (missing from the wheel), and its start/shutdown run
``ray stop --force``, which would kill every other Ray runtime on the machine. So the head
is started here the same way, on free ports and a private temp dir, and every process of
this cluster carries a marker in its environment: shutdown (and a reaper process that
outlives a killed test) only ever signals processes carrying this cluster's marker, or
their descendants.

Test-only settings, each marked ``TEST-ONLY`` below, exist to make a minutes-long
autoscaling scenario take seconds; none of them is needed on a real cluster. Set
TIDAL_KEEP_FAKE_CLUSTER=1 to keep a cluster's temp dir (its logs) after shutdown.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Dict, List, Optional, Set

MARK = "TIDAL_FAKE_CLUSTER_MARK"

# TEST-ONLY: the raylets report to the GCS every second and a node is declared dead after
# 3 missed health checks (default: about 30 s), so a killed node is noticed within seconds.
FAST_NODE_FAILURE = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def free_port() -> int:
    s = socket.socket()
    s.bind(("", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------- process bookkeeping (/proc)
def _read(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _process_table() -> Dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process."""
    parent: Dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        stat = _read(int(d), "stat")
        if not stat:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        if fields[0] != b"Z":  # a zombie is already dead
            parent[int(d)] = int(fields[1])
    return parent


def _with_descendants(roots: Set[int], parent: Dict[int, int]) -> Set[int]:
    out = set(roots)
    grown = True
    while grown:
        grown = False
        for pid, ppid in parent.items():
            if ppid in out and pid not in out:
                out.add(pid)
                grown = True
    return out


def marked_pids(mark: str) -> Set[int]:
    """Live processes whose environment carries ``MARK=mark``, and their descendants (a Ray
    worker may rewrite its own environment block with setproctitle; its parent keeps it)."""
    parent = _process_table()
    needle = f"{MARK}={mark}".encode()
    marked = {pid for pid in parent if needle in _read(pid, "environ").split(b"\0")}
    marked = _with_descendants(marked, parent)
    marked.discard(os.getpid())
    return marked


def kill_marked(mark: str, term_wait_s: float = 5.0) -> Set[int]:
    """SIGTERM, then SIGKILL, every process of the cluster ``mark``; returns survivors."""
    pids = marked_pids(mark)
    for sig, wait in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, 3.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.time() + wait
        while time.time() < end and marked_pids(mark):
            time.sleep(0.2)
        pids = marked_pids(mark)
        if not pids:
            break
    return pids


# ------------------------------------------------------------------------------- cluster
class FakeAutoscalingCluster:
    """A head node (``head_cpus`` CPUs) plus ``min_workers..max_workers`` autoscaled worker
    nodes of ``worker_resources`` each (``set_max_workers`` changes the ceiling while it runs).
    Use as a context manager; ``address`` is what ``RAY_ADDRESS`` should hold. ``env`` is added
    to the environment of every process of the cluster (raylets, and so the Ray workers they
    start). With ``max_workers=0`` it is a private single-node Ray whose every process has
    RAY_ADDRESS pointing at it, so that nothing in it can mistake another Ray on the machine
    for its own."""

    def __init__(self, worker_resources: Optional[Dict] = None, head_cpus: float = 0,
                 min_workers: int = 1, max_workers: int = 3, idle_timeout_minutes: float = 5.0,
                 system_config: Optional[Dict] = None, env: Optional[Dict[str, str]] = None,
                 coordinator_tick_s: Optional[float] = 2.0, object_store_bytes: int = 100_000_000,
                 temp_root: str = "/tmp"):
        import ray._private.services as services

        self.port = free_port()
        self.address = f"{services.get_node_ip_address()}:{self.port}"
        self.mark = uuid.uuid4().hex
        self.head_cpus = head_cpus
        self.system_config = FAST_NODE_FAILURE if system_config is None else system_config
        self.env = dict(env or {})
        self.coordinator_tick_s = coordinator_tick_s
        self.object_store_bytes = object_store_bytes
        self.temp_root = temp_root
        self.temp_dir: Optional[str] = None
        self.config_path = ""
        self._reaper: Optional[subprocess.Popen] = None
        worker = {"resources": {**(worker_resources or {"CPU": 1}),
                                "object_store_memory": object_store_bytes},
                  "node_config": {}, "min_workers": min_workers, "max_workers": max_workers}
        self.config = {
            "cluster_name": "fake_multinode",
            "max_workers": max_workers,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                # without it the provider joins new nodes to <ip>:6379, i.e. maybe another Ray
                "gcs_address": self.address,
            },
            "available_node_types": {
                "cpu_worker": worker,
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                     "max_workers": 0},
            },
            "head_node_type": "ray.head.default",
            "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
            "docker": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        }

    # -- lifecycle
    def start(self, wait_workers_s: float = 60.0) -> "FakeAutoscalingCluster":
        # a short temp dir: Ray's unix socket paths must stay under 108 characters
        self.temp_dir = tempfile.mkdtemp(prefix="tfc", dir=self.temp_root)
        self._start_reaper()
        self.config_path = os.path.join(self.temp_dir, "autoscaling.json")
        self._write_config()
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray_bin, "start", "--head", f"--autoscaling-config={self.config_path}",
               f"--port={self.port}", f"--temp-dir={self.temp_dir}",
               f"--num-cpus={self.head_cpus}", f"--object-store-memory={self.object_store_bytes}",
               f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
               "--dashboard-agent-listen-port=0", "--disable-usage-stats"]
        if self.system_config:
            cmd.append("--system-config=" + json.dumps(self.system_config, separators=(",", ":")))
        env = dict(os.environ, **self.env, **{MARK: self.mark})
        env.update(
            RAY_FAKE_CLUSTER="1",  # lets the autoscaler load FakeMultiNodeProvider
            # TEST-ONLY: the autoscaler looks at pending demand every second (default 5 s)
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE="disabled",  # the driver joins with the same setting
            # every process of this cluster (e.g. Ray Train's PlacementGroupCleaner, which uses
            # the state API) must talk to this cluster, never auto-discover another local Ray
            RAY_ADDRESS=self.address,
        )
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=120)
        if done.returncode:
            raise RuntimeError(f"fake cluster: `ray start --head` failed ({done.returncode}): "
                               f"{done.stderr.decode(errors='replace')[-3000:]}")
        import ray._private.services

        ray._private.services.find_gcs_addresses.cache_clear()
        self._setup(wait_workers_s)
        return self

    def _setup(self, wait_workers_s: float) -> None:
        """Wait for the ``min_workers`` nodes, and install the fast coordinator."""
        import ray

        ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
        try:
            want = self.config["available_node_types"]["cpu_worker"]["min_workers"]
            end = time.time() + wait_workers_s
            while len(self.worker_nodes()) < want:
                if time.time() > end:
                    raise TimeoutError(f"fake cluster: {len(self.worker_nodes())} of {want} "
                                       f"initial worker nodes after {wait_workers_s:.0f} s "
                                       f"(logs in {self.temp_dir})")
                time.sleep(0.5)
            if self.coordinator_tick_s:
                install_fast_autoscaling_coordinator(self.coordinator_tick_s)
        finally:
            ray.shutdown()

    def shutdown(self) -> Set[int]:
        """Kill every process of this cluster (and only those); returns any survivors."""
        survivors = kill_marked(self.mark)
        if self._reaper is not None:
            self._reaper.terminate()
            try:
                self._reaper.wait(5)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
            self._reaper = None
        if self.temp_dir and not survivors and not os.environ.get("TIDAL_KEEP_FAKE_CLUSTER"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return survivors

    def __enter__(self) -> "FakeAutoscalingCluster":
        try:
            return self.start()
        except BaseException:
            self.shutdown()
            raise

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _start_reaper(self) -> None:
        """A watchdog that kills this cluster if the test process dies without cleaning up
        (e.g. SIGKILLed). It does not carry the marker, so shutdown() stops it by its pid."""
        env = {k: v for k, v in os.environ.items() if k != MARK}
        self._reaper = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--reap", self.mark, str(os.getpid()),
             self.temp_dir],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

    def set_max_workers(self, n: int) -> None:
        """Let the autoscaler run up to ``n`` worker nodes (as a cloud granting more quota):
        it re-reads its config file on every update, and launches nodes for pending demand."""
        self.config["max_workers"] = n
        self.config["available_node_types"]["cpu_worker"]["max_workers"] = n
        self._write_config()

    def _write_config(self) -> None:
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.config, f)
        os.replace(tmp, self.config_path)  # never a half-written config for the autoscaler

    # -- nodes (need a Ray connection to this cluster)
    @staticmethod
    def worker_nodes() -> List[Dict]:
        """The alive non-head nodes, as ``ray.nodes()`` describes them."""
        import ray

        return [n for n in ray.nodes()
                if n["Alive"] and "node:__internal_head__" not in n["Resources"]]

    def raylet_pid(self, node_id: str) -> Optional[int]:
        for pid in marked_pids(self.mark):
            if _read(pid, "comm").strip() == b"raylet" and \
                    f"--node_id={node_id}".encode() in _read(pid, "cmdline"):
                return pid
        return None

    def kill_node(self, node_id: str) -> Set[int]:
        """Lose a node the way a vanished machine is lost: SIGKILL its raylet and, at the same
        moment, every process under it (its Ray workers and agents; a worker would otherwise
        run on for a few seconds before noticing its raylet is gone). Returns the pids."""
        pid = self.raylet_pid(node_id)
        if pid is None:
            raise LookupError(f"no raylet of this cluster for node {node_id}")
        pids = _with_descendants({pid}, _process_table()) & (marked_pids(self.mark) | {pid})
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids


def install_fast_autoscaling_coordinator(tick_s: float) -> None:
    """TEST-ONLY: pre-create Ray's AutoscalingCoordinator actor with a short tick.

    Ray Train's elastic policy learns of new and lost nodes from this actor, which refreshes
    its view of the cluster only every 20 s (``TICK_INTERVAL_S``). Ray Train gets it by name
    with ``get_if_exists=True``, so it picks up this one, identical but for the tick. The
    subclass is built at runtime, so it is pickled by value (workers never import this file).
    """
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        _AutoscalingCoordinatorActor,
    )
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = type("FastAutoscalingCoordinator", (_AutoscalingCoordinatorActor,),
               {"TICK_INTERVAL_S": tick_s})
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(cls).options(
        name="AutoscalingCoordinator", namespace="AutoscalingCoordinator",
        get_if_exists=True, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False),
    ).remote()
    ray.get(actor.get_reserved_resources.remote("probe"), timeout=60)


def _reap(mark: str, parent: int, temp_dir: str) -> None:
    while _read(parent, "stat") and _read(parent, "stat").rsplit(b")", 1)[1].split()[0] != b"Z":
        time.sleep(1.0)
    if not kill_marked(mark):
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--reap":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    _reap(sys.argv[2], int(sys.argv[3]), sys.argv[4])
