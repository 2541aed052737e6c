"""A tiny actor that carries metrics from rank 0 to the driver while training runs."""
from __future__ import annotations

from typing import Dict, List

import ray


@ray.remote(num_cpus=0)
class MetricsHub:
    def __init__(self) -> None:
        self._queue: List[Dict] = []

    def push(self, record: Dict) -> None:
        self._queue.append(record)

    def drain(self) -> List[Dict]:
        out, self._queue = self._queue, []
        return out
