"""Output pacing: restyled frames leave at the source rate with a steady latency.

The engine works in chunks, so outputs come in bursts (four frames at once, then nothing). Released as they come,
the viewer would see stutter. :class:`Pacer` gives each output a due time ``arrival + L``, where ``arrival`` is when
its input frame was taken in and ``L`` is one latency for the whole stream: inputs that arrive evenly leave evenly.

``L`` follows the observed processing latency (time from arrival to the output being ready): it jumps up at once when
outputs would otherwise be late (one visible hitch, then steady again) and creeps down slowly when there is slack,
so it settles just above the p95 of what the engine needs. An output ready after its due time counts as a deadline
miss. Due times never go backwards, and consecutive outputs keep at least half a frame period apart, so a backlog
drains at no more than twice the source rate instead of in a burst that would overrun the reader's ring.

:class:`OutputThread` releases the outputs of every session at their due times, so pacing holds while the compute
thread is inside the model.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

log = logging.getLogger(__name__)

_QUANTILE = 95.0
_DECAY = 0.02
"""Fraction of the slack given back per output when the target latency is above what the engine needs."""


class Pacer:
    """Due times for one stream's outputs. ``schedule`` each output in index order as it becomes ready."""

    def __init__(self, fps: float, *, margin_frames: float = 0.25, window: int = 64) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.period_ns = int(1e9 / fps)
        self.margin_ns = int(self.period_ns * margin_frames)
        self.target_ns = 0
        self._observed: deque[int] = deque(maxlen=window)
        self._last_due_ns = 0

    @property
    def target_latency_ms(self) -> float:
        return self.target_ns / 1e6

    def schedule(self, *, arrival_ns: int, ready_ns: int) -> tuple[int, bool]:
        """``(due_ns, late)`` for an output whose input arrived at ``arrival_ns`` and which is ready at
        ``ready_ns``. ``late``: it cannot leave at ``arrival + L`` (a deadline miss)."""
        observed = max(0, ready_ns - arrival_ns)
        self._observed.append(observed)
        wanted = int(np.percentile(np.asarray(self._observed), _QUANTILE)) + self.margin_ns
        if wanted > self.target_ns:
            self.target_ns = wanted
        else:
            self.target_ns -= int((self.target_ns - wanted) * _DECAY)
        due = arrival_ns + self.target_ns
        late = due < ready_ns
        due = max(due, ready_ns)
        if self._last_due_ns:
            # Never faster than twice the source rate, even when catching up: a burst would overrun the reader.
            due = max(due, self._last_due_ns + self.period_ns // 2)
        self._last_due_ns = due
        return due, late


T = TypeVar("T")


@dataclass(order=True)
class _Scheduled(Generic[T]):
    due_ns: int
    order: int
    key: str = field(compare=False)
    item: T = field(compare=False)


class OutputThread(threading.Thread, Generic[T]):
    """Releases every session's outputs at their due times, off the compute thread.

    The compute thread is inside the model for a whole chunk at a time (tens of milliseconds on a GPU, far more on
    a busy CPU); outputs released from there would leave in bursts. This thread sleeps on a condition until the
    earliest due time and calls ``release(item)`` for each item then. Writes are a memcpy into the output ring (or
    a hand-over to the IO thread for network sessions), and torch releases the GIL while it computes, so the
    release times hold while the model runs.

    :attr:`lock` is held during every release: hold it to close a session's outputs safely (then ``forget`` it).
    """

    def __init__(self, release: Callable[[T], None]) -> None:
        super().__init__(name="sdlive-output", daemon=True)
        self.lock = threading.RLock()
        self._cv = threading.Condition(self.lock)
        self._heap: list[_Scheduled[T]] = []
        self._release = release
        self._order = 0
        self._stopping = False

    def submit(self, key: str, item: T, due_ns: int) -> None:
        with self._cv:
            heapq.heappush(self._heap, _Scheduled(due_ns, self._order, key, item))
            self._order += 1
            self._cv.notify()

    def forget(self, key: str) -> int:
        """Drop the pending items of ``key``; returns how many."""
        with self._cv:
            before = len(self._heap)
            self._heap = [s for s in self._heap if s.key != key]
            heapq.heapify(self._heap)
            return before - len(self._heap)

    def pending(self, key: str) -> int:
        with self._cv:
            return sum(1 for s in self._heap if s.key == key)

    def stop(self, timeout_s: float = 2.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self.join(timeout_s)

    def run(self) -> None:
        with self._cv:
            while not self._stopping:
                if not self._heap:
                    self._cv.wait()
                    continue
                wait_ns = self._heap[0].due_ns - time.monotonic_ns()
                if wait_ns > 0:
                    self._cv.wait(wait_ns / 1e9)
                    continue
                scheduled = heapq.heappop(self._heap)
                try:
                    self._release(scheduled.item)
                except Exception:  # noqa: BLE001 - one bad release must not stop every session's output
                    log.exception("releasing an output of %s failed", scheduled.key)
