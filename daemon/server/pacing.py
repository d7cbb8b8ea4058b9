"""Output pacing: restyled frames leave at the source rate with a steady latency.

The engine works in chunks, so outputs come in bursts (four frames at once, then nothing). Released as they come,
the viewer would see stutter. :class:`Pacer` gives each output a due time ``arrival + L``, where ``arrival`` is when
its input frame was taken in and ``L`` is one latency for the whole stream: inputs that arrive evenly leave evenly.

``L`` follows the observed processing latency (time from arrival to the output being ready): it jumps up at once when
outputs would otherwise be late (one visible hitch, then steady again) and creeps down slowly when there is slack,
so it settles just above the p95 of what the engine needs. An output ready after its due time counts as a deadline
miss. Due times never go backwards.

:class:`OutputThread` releases the outputs of every session at their due times, so pacing holds while the compute
thread is inside the model, keeping consecutive releases of a session at least half a frame period apart (a backlog
drains at no more than twice the source rate instead of in a burst that would overrun the reader's ring) and each
session's waiting outputs bounded (a source faster than its declared fps drops its oldest waiting output, counted as
``dropped_out``, rather than piling up).

Offline sessions (``open_session`` ``pacing: "offline"``) skip the pacer: each output is due as soon as it is
ready, with no gap, so a render runs at the model's speed.
"""

from __future__ import annotations

import bisect
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
        due = max(due, ready_ns, self._last_due_ns)  # never backwards; the gap between releases is the output
        self._last_due_ns = due  # thread's (gap_ns): spaced here, a source faster than declared would drift
        return due, late

    @property
    def gap_ns(self) -> int:
        """The least time between two releases: half a period (a backlog drains at no more than twice the source
        rate, never in a burst that would overrun the reader's ring)."""
        return self.period_ns // 2


T = TypeVar("T")

DEFAULT_QUEUE_LIMIT = 8
"""Outputs one session may have waiting for release beyond what its latency target holds back (two chunks of four):
more means the source runs faster than its declared rate can release, and the oldest waiting output is dropped
(newest wins) and counted."""
MAX_QUEUE_LIMIT = 32
"""The most outputs one session may ever have waiting, however long its latency target (what memory is sized for)."""


def queue_limit(target_latency_ns: int, fps: float) -> int:
    """A lane's bound: the outputs a steady stream holds back for its latency target, plus two chunks."""
    held = int(target_latency_ns * fps / 1e9) + 1
    return max(DEFAULT_QUEUE_LIMIT, min(MAX_QUEUE_LIMIT, held + DEFAULT_QUEUE_LIMIT))


BLOCKED_RETRY_NS = 1_000_000
"""How soon an item whose ``blocked()`` said True is asked again (its reader is copying a frame out: short)."""


@dataclass(order=True)
class _Entry(Generic[T]):
    due_ns: int
    order: int
    item: T = field(compare=False)


@dataclass
class _Lane(Generic[T]):
    """One key's waiting outputs, in due order, and when it last released one."""

    waiting: list[_Entry[T]] = field(default_factory=list)
    last_release_ns: int = 0
    version: int = 0


class OutputThread(threading.Thread, Generic[T]):
    """Releases every session's outputs at their due times, off the compute thread.

    The compute thread is inside the model for a whole chunk at a time (tens of milliseconds on a GPU, far more on
    a busy CPU); outputs released from there would leave in bursts. This thread sleeps on a condition until the
    earliest due time and calls ``release(item)`` for each item then. Writes are a memcpy into the output ring (or
    a hand-over to the IO thread for network sessions), and torch releases the GIL while it computes, so the
    release times hold while the model runs.

    Each key (session) has a lane: a bounded queue of waiting items and a minimum gap between two releases. An item
    may say, as attributes, ``gap_ns`` (its session's gap: half a frame period live, 0 offline) and
    ``queue_limit``; it may have a ``dropped()`` method, called (under the lock) when it is dropped, and a
    ``blocked()`` method: while that says True (an offline session's reader has no room) the lane waits. The gap is
    applied here, at release, not baked into due times: a backlog after a hitch drains at no more than twice the
    source rate, and a source faster than its declared rate fills its lane, whose oldest item is dropped (newest
    wins), instead of pushing every later due time further out (unbounded memory and latency).

    :attr:`lock` is held during every release: hold it to close a session's outputs safely (then ``forget`` it).
    """

    def __init__(self, release: Callable[[T], None], *, queue_limit: int = DEFAULT_QUEUE_LIMIT) -> None:
        super().__init__(name="sdlive-output", daemon=True)
        self.lock = threading.RLock()
        self._cv = threading.Condition(self.lock)
        self._lanes: dict[str, _Lane[T]] = {}
        self._heap: list[tuple[int, int, str, int]] = []  # (when, order, key, lane version): one live entry per lane
        self._release = release
        self._queue_limit = queue_limit
        self._order = 0
        self._stopping = False
        self.dropped = 0
        """Items dropped because their lane was full, all keys together."""

    def submit(self, key: str, item: T, due_ns: int) -> None:
        with self._cv:
            lane = self._lanes.setdefault(key, _Lane())
            bisect.insort(lane.waiting, _Entry(due_ns, self._order, item))
            self._order += 1
            limit = max(1, int(getattr(item, "queue_limit", self._queue_limit)))
            while len(lane.waiting) > limit:
                self._drop(lane.waiting.pop(0).item)
            self._schedule(key, lane)
            self._cv.notify()

    def _drop(self, item: T) -> None:
        self.dropped += 1
        on_drop = getattr(item, "dropped", None)
        if on_drop is not None:
            try:
                on_drop()
            except Exception:  # noqa: BLE001 - counting a drop must not stop the output thread
                log.exception("counting a dropped output failed")

    def _schedule(self, key: str, lane: _Lane[T]) -> None:
        """(Re)queue the lane's head: at its due time, or one gap after the lane's last release if later."""
        lane.version += 1
        if not lane.waiting:
            return
        head = lane.waiting[0]
        gap = int(getattr(head.item, "gap_ns", 0))
        when = max(head.due_ns, lane.last_release_ns + gap) if lane.last_release_ns else head.due_ns
        heapq.heappush(self._heap, (when, head.order, key, lane.version))

    def forget(self, key: str) -> int:
        """Drop the pending items of ``key`` (not counted as drops: the session is closing); returns how many."""
        with self._cv:
            lane = self._lanes.pop(key, None)
            if lane is None:
                return 0
            lane.version += 1
            return len(lane.waiting)

    def pending(self, key: str) -> int:
        with self._cv:
            lane = self._lanes.get(key)
            return len(lane.waiting) if lane is not None else 0

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
                when, _order, key, version = self._heap[0]
                lane = self._lanes.get(key)
                if lane is None or lane.version != version or not lane.waiting:
                    heapq.heappop(self._heap)  # superseded: the lane's head changed or it was forgotten
                    continue
                wait_ns = when - time.monotonic_ns()
                if wait_ns > 0:
                    self._cv.wait(wait_ns / 1e9)
                    continue
                heapq.heappop(self._heap)
                blocked = getattr(lane.waiting[0].item, "blocked", None)
                if blocked is not None and blocked():  # the reader has no room yet (offline): ask again shortly
                    heapq.heappush(self._heap, (time.monotonic_ns() + BLOCKED_RETRY_NS, _order, key, version))
                    continue
                entry = lane.waiting.pop(0)
                lane.last_release_ns = time.monotonic_ns()
                self._schedule(key, lane)
                try:
                    self._release(entry.item)
                except Exception:  # noqa: BLE001 - one bad release must not stop every session's output
                    log.exception("releasing an output of %s failed", key)
