"""Watches a driver that started a local Ray runtime; when the driver dies (even by
SIGKILL, which no handler sees) it ends that runtime's processes, so no Ray agent is
left orphaned on the machine.

    python -m tidal.train.reaper <raylet pid> <gcs pid> ...   (stdin: a pipe from the driver)

The driver holds the other end of stdin; end-of-file means it is gone. Only processes
that descend from the given Ray processes (snapshotted while the driver lives, with
their start times, so a recycled pid is never touched) are signalled.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Dict, List, Tuple


def _snapshot(roots: List[int]) -> Dict[int, float]:
    import psutil

    out: Dict[int, float] = {}
    for pid in roots:
        try:
            proc = psutil.Process(pid)
            out[pid] = proc.create_time()
            for child in proc.children(recursive=True):
                out[child.pid] = child.create_time()
        except psutil.Error:
            continue
    return out


def _alive(known: Dict[int, float]) -> List[Tuple[int, object]]:
    import psutil

    out = []
    for pid, created in known.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                out.append((pid, proc))
        except psutil.Error:
            continue
    return out


def reap(known: Dict[int, float], grace_s: float = 5.0) -> int:
    """SIGTERM every still-running known process, SIGKILL what remains after ``grace_s``."""
    import psutil

    procs = [p for _, p in _alive(known)]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(procs)


def main(argv: List[str]) -> None:
    roots = [int(a) for a in argv]
    known: Dict[int, float] = {}
    gone = threading.Event()

    def wait_for_eof():
        sys.stdin.buffer.read()  # returns when the driver's end of the pipe closes
        gone.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    while not gone.wait(2.0):
        known.update(_snapshot(roots))  # new workers and agents appear over time
    time.sleep(1.0)  # a driver exiting normally shuts Ray down itself: give it a moment
    reap(known)


if __name__ == "__main__":
    main(sys.argv[1:])
