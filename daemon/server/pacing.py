"""Output pacing: restyled frames leave at the source rate with a steady latency.

The engine works in chunks, so outputs come in bursts (four frames at once, then nothing). Released as they come,
the viewer would see stutter. The pacer holds each output until ``arrival + L``, where ``arrival`` is when its input
frame was taken in and ``L`` is one latency for the whole stream: inputs that arrive evenly leave evenly.

``L`` follows the observed processing latency (time from arrival to the output being ready): it jumps up at once when
outputs would otherwise be late (one visible hitch, then steady again) and creeps down slowly when there is slack,
so it settles just above the p95 of what the engine needs. An output ready after its due time leaves at once and
counts as a deadline miss. Due times never go backwards, and consecutive outputs keep at least half a frame period
apart unless they are already late, so a backlog drains quickly without a burst.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")

_QUANTILE = 95.0
_DECAY = 0.02
"""Fraction of the slack given back per output when the target latency is above what the engine needs."""


@dataclass(order=True)
class _Pending(Generic[T]):
    due_ns: int
    order: int
    item: T = field(compare=False)
    late: bool = field(compare=False, default=False)
    arrival_ns: int = field(compare=False, default=0)


class Pacer(Generic[T]):
    """Holds outputs until their due time. ``push`` in index order; ``pop_due`` what may leave now."""

    def __init__(self, fps: float, *, margin_frames: float = 0.25, window: int = 64) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.period_ns = int(1e9 / fps)
        self.margin_ns = int(self.period_ns * margin_frames)
        self.target_ns = 0
        self._observed: deque[int] = deque(maxlen=window)
        self._heap: list[_Pending[T]] = []
        self._order = 0
        self._last_due_ns = 0

    @property
    def target_latency_ms(self) -> float:
        return self.target_ns / 1e6

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, item: T, *, arrival_ns: int, ready_ns: int) -> None:
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
        heapq.heappush(self._heap, _Pending(due, self._order, item, late, arrival_ns))
        self._order += 1

    def next_due_ns(self) -> int | None:
        return self._heap[0].due_ns if self._heap else None

    def pop_due(self, now_ns: int) -> list[tuple[T, int, bool]]:
        """Items whose time has come, oldest first, as ``(item, arrival_ns, late)``."""
        out: list[tuple[T, int, bool]] = []
        while self._heap and self._heap[0].due_ns <= now_ns:
            p = heapq.heappop(self._heap)
            out.append((p.item, p.arrival_ns, p.late))
        return out

    def drain(self) -> list[T]:
        items = [p.item for p in sorted(self._heap)]
        self._heap.clear()
        return items
