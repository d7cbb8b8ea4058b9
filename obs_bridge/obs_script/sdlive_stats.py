"""The script's figures for benchmarks and tests: with ``$SDLIVE_OBS_STATS`` set, a thread rewrites that JSON file
twice a second (atomically: write a temporary file, then rename). No OBS imports."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

WRITE_INTERVAL_S = 0.5
TIMING_WINDOW = 600  # samples kept for each percentile (about 20 s at 30 fps)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0..1) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class StatsWriter:
    """Writes ``snapshot()`` to ``path`` every WRITE_INTERVAL_S until ``stop()``."""

    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]]):
        self.path = path
        self._snapshot = snapshot
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdlive-stats", daemon=True)

    def start(self) -> StatsWriter:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 1.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        tmp = self.path + ".tmp"
        while not self._stop.wait(WRITE_INTERVAL_S):
            try:
                with open(tmp, "w", encoding="utf-8") as fh:
                    json.dump(self._snapshot(), fh)
                os.replace(tmp, self.path)
            except OSError:
                pass
