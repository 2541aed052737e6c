"""A tiny actor that carries metrics from rank 0 to the driver while training runs, and
remembers how far each attempt of the run got (for telling a repeating failure from lost
machines)."""
from __future__ import annotations

from typing import Dict, List

import ray


@ray.remote(num_cpus=0)
class MetricsHub:
    def __init__(self) -> None:
        self._queue: List[Dict] = []
        self._attempts: List[Dict] = []
        self._stop = False

    def push(self, record: Dict) -> None:
        if record.get("event") == "start":
            self._attempts.append({"start_step": record["step"], "last_step": record["step"],
                                   "world_size": record.get("world_size")})
        elif "event" not in record and "step" in record:
            self.heartbeat(record["step"])
        self._queue.append(record)

    def heartbeat(self, step: int) -> None:
        if self._attempts:
            self._attempts[-1]["last_step"] = max(self._attempts[-1]["last_step"], step)

    def attempts(self) -> List[Dict]:
        """Every attempt so far: where it started and the last step it finished."""
        return list(self._attempts)

    def drain(self) -> List[Dict]:
        out, self._queue = self._queue, []
        return out

    def request_stop(self) -> None:
        """Ask the run to end early (at the next step, cleanly, releasing its workers)."""
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop
