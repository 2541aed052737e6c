"""Live per-stage progress for ``jobs/prepare.py``: records and tokens per second per stage.

Stages that run in Ray Data tasks (curate, tokenize) report each finished batch to a small
counter actor (fire-and-forget, one call per batch) for the live view, and the driver sets
their exact totals when they finish; stages in the driver (dedup, pack) count directly. A thread in the driver polls the counters and draws one bar per stage, so
a user sees every stage's rate while it runs, on a laptop or a cluster alike. When the
job ends the same numbers (records, tokens, seconds) go into the curation report.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Tuple


class _Counters:
    """Per-stage counters (a Ray actor in the job; a plain object in tests)."""

    def __init__(self) -> None:
        self.c: Dict[str, List[float]] = {}

    def add(self, stage: str, records: int, tokens: int = 0) -> None:
        now = time.time()
        c = self.c.setdefault(stage, [0, 0, now, now])
        c[0] += records
        c[1] += tokens
        c[3] = now

    def get(self) -> Dict[str, List[float]]:
        return self.c


def report(meter, stage: str, records: int, tokens: int = 0) -> None:
    """Called from a stage's batch function; ``meter`` is None outside a metered job."""
    if meter is not None:
        meter.add.remote(stage, records, tokens)


class StageProgress:
    """``with StageProgress([(stage, label), ...]) as p:`` then pass ``p.meter`` to the
    Ray Data batch functions, call ``p.add`` for driver-side stages, ``p.total(stage, n)``
    once a total is known, and ``p.done(stage)`` when a stage finishes."""

    def __init__(self, stages: List[Tuple[str, str]], show: bool = True, poll_s: float = 0.5):
        self.stages = stages
        self.show = show
        self.poll_s = poll_s
        self.local = _Counters()
        self.remote: Dict[str, List[float]] = {}
        self.finished: Dict[str, float] = {}
        self.started: Dict[str, float] = {}
        self.meter = None
        self._stop = threading.Event()

    # -- driver side -------------------------------------------------------------------
    def __enter__(self) -> "StageProgress":
        import ray

        self.meter = ray.remote(num_cpus=0)(_Counters).remote()
        self._bar = None
        if self.show:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]{task.description:<9}"), BarColumn(),
                                 TextColumn("{task.fields[counts]}"), TimeElapsedColumn())
            self._tasks = {s: self._bar.add_task(label, total=None, counts="waiting", start=False)
                           for s, label in self.stages}
            self._bar.start()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._refresh()
        if self._bar is not None:
            self._bar.stop()
        import ray

        try:
            ray.kill(self.meter)
        except Exception:  # the cluster may already be going down with an error
            pass

    def add(self, stage: str, records: int, tokens: int = 0) -> None:
        self.local.add(stage, records, tokens)

    def set(self, stage: str, records: int, tokens: int = 0) -> None:
        """The driver's exact final count for a stage that ran in Ray tasks (their reports
        travel asynchronously and only feed the live display)."""
        now = time.time()
        self.local.c[stage] = [records, tokens, self.started.get(stage, now), now]

    def start(self, stage: str) -> None:
        self.started.setdefault(stage, time.time())

    def total(self, stage: str, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._tasks[stage], total=n)

    def done(self, stage: str) -> None:
        self.finished.setdefault(stage, time.time())

    def counts(self) -> Dict[str, Dict[str, float]]:
        """``{stage: {records, tokens, seconds, records_per_s, tokens_per_s}}`` so far."""
        out = {}
        merged = dict(self.remote)
        for s, c in self.local.get().items():
            merged[s] = c
        for s, _ in self.stages:
            if s not in merged:
                continue
            records, tokens, first, _ = merged[s]
            t0 = self.started.get(s, first)
            t1 = self.finished.get(s, time.time())
            secs = max(t1 - t0, 1e-9)
            out[s] = {"records": int(records), "tokens": int(tokens), "seconds": round(secs, 3),
                      "records_per_s": round(records / secs, 1), "tokens_per_s": round(tokens / secs, 1)}
        return out

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._refresh()

    def _refresh(self) -> None:
        import ray

        try:
            self.remote = ray.get(self.meter.get.remote(), timeout=5)
        except Exception:  # a slow poll only delays the display
            return
        if self._bar is None:
            return
        for s, c in self.counts().items():
            task = self._tasks[s]
            text = f"{c['records']:,} records ({c['records_per_s']:,.0f}/s)"
            if c["tokens"]:
                text += f"  {c['tokens']:,} tokens ({c['tokens_per_s']:,.0f}/s)"
            if not self._bar.tasks[task].started:
                self._bar.start_task(task)
            self._bar.update(task, completed=c["records"], counts=text)


def summary_line(counts: Dict[str, Dict[str, float]]) -> Optional[str]:
    parts = []
    for s, c in counts.items():
        part = f"{s} {c['records']:,} rec/{c['seconds']:.1f}s ({c['records_per_s']:,.0f}/s"
        if c["tokens"]:
            part += f", {c['tokens_per_s']:,.0f} tok/s"
        parts.append(part + ")")
    return "stages: " + "; ".join(parts) if parts else None
