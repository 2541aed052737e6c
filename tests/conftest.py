import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("TIDAL_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
PYTHON = sys.executable


def free_port() -> int:
    """A TCP port nothing listens on now (for a gloo rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_rank(rank: int, world: int, port: int):
    """A gloo process group for one rank that ``torch.multiprocessing`` spawned.

    Used as a context manager around the rank's work. When the work raises, the group is
    destroyed and the error propagates (the spawn reports it). When it succeeds, every rank
    meets at a barrier (none tears down while another is still in a collective), the group
    is destroyed, and the process ends with ``os._exit(0)``: gloo's C++ threads can abort
    the interpreter's own finalisation (SIGABRT, "terminate called without an active
    exception") after the results were already written."""
    import contextlib

    import torch.distributed as dist

    @contextlib.contextmanager
    def group():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            yield
        except BaseException:
            dist.destroy_process_group()
            raise
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    return group()

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


# -- two test processes at once (pytest-xdist, `-n 2` in pyproject's addopts) ---------------
# Most tests leave a core idle for much of their time (process and Ray start-up, waits), so
# two run side by side, one module per process (`--dist loadfile`: module fixtures are built
# once). Tests marked `exclusive` (wall-clock assertions, fake autoscaling clusters with
# deadlines) run alone: they take the session's lock exclusively, every other test takes it
# shared, and a turnstile in front of it keeps a waiting exclusive test from being overtaken
# by the other process's next tests.

import contextlib  # noqa: E402
import fcntl  # noqa: E402

import pytest  # noqa: E402


def _lock_dir():
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return None  # one test process: nothing to share
    path = os.path.join("/tmp", f"tidal-pytest-{run}")
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def _flock(path: str, mode: int):
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    where = _lock_dir()
    if where is None:
        yield
        return
    mode = fcntl.LOCK_EX if item.get_closest_marker("exclusive") else fcntl.LOCK_SH
    with contextlib.ExitStack() as held:
        with _flock(os.path.join(where, "turnstile"), fcntl.LOCK_EX):
            held.enter_context(_flock(os.path.join(where, "tests"), mode))
        yield  # setup (module fixtures included), call and teardown, under the lock


def pytest_collection_modifyitems(session, config, items):
    """Module order for two test processes: the `long` module first (it starts at once and
    overlaps everything else), then the other slow modules, then the rest (seconds each:
    they fill the gaps), and last the modules whose every test is `exclusive`: those run
    alone anyway, and at the end they wait only for the other process's current short test,
    never for a long one. Stable within each group; every test process sorts the same way,
    as pytest-xdist requires, and `--no-loadscope-reorder` (pyproject's addopts) keeps xdist
    from re-sorting the modules by their number of tests."""
    def rank(mod) -> int:
        tests = by_module[mod]
        if any(it.get_closest_marker("long") for it in tests):
            return 0
        if all(it.get_closest_marker("exclusive") for it in tests):
            return 3
        return 1 if any(it.get_closest_marker("slow") for it in tests) else 2

    by_module = {}
    for it in items:
        by_module.setdefault(it.nodeid.split("::")[0], []).append(it)
    order = sorted(by_module, key=rank)
    items[:] = [it for mod in order for it in by_module[mod]]


def shared_once(name: str):
    """A lock and a directory every test process of this session shares (``None`` with one
    process), for work that one process does and the others reuse."""
    where = _lock_dir()
    if where is None:
        return None, None
    return _flock(os.path.join(where, f"{name}.lock"), fcntl.LOCK_EX), os.path.join(where, name)
