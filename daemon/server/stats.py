"""Per-session counters and the once-a-second stats snapshot published on PUB (topic ``stats``).

Pure bookkeeping: no sockets, no tensors. Times are ``time.monotonic_ns()`` of the daemon process.
Latency is measured inside the daemon: from the moment an input frame is taken in (read from the ring, or received
from the network) to the moment its restyled output leaves (written to the output ring / sent).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

_WINDOW_NS = 2_000_000_000
"""Rates look at the last two seconds."""
_LATENCY_SAMPLES = 120
"""Latency quantiles look at the last outputs (they stay readable while a stream pauses)."""


def _rate(times: deque[int], now_ns: int) -> float:
    while times and now_ns - times[0] > _WINDOW_NS:
        times.popleft()
    if len(times) < 2:
        return 0.0
    span = max(now_ns - times[0], times[-1] - times[0])
    return (len(times) - 1) * 1e9 / span if span > 0 else 0.0


class CounterSnapshot(NamedTuple):
    """A session's counters at one moment; the names are ``SessionStats`` fields (``Session.stats`` passes them on)."""

    fps_in: float
    fps_out: float
    frames_in: int
    frames_out: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None
    jitter_ms: float | None
    deadline_misses: int
    dropped_late: int
    late_in: int
    shared_chunks: int
    bad_frames: int
    push_ms: float
    stage_ms: dict[str, float]


@dataclass
class SessionCounters:
    """Counters of one session; ``snapshot()`` reads them consistently."""

    fps_target: float
    frames_in: int = 0
    frames_out: int = 0
    engine_outputs: int = 0
    deadline_misses: int = 0
    """Outputs that were ready after the pacer's due time (they leave late, at once)."""
    dropped_late: int = 0
    """Inputs the deadline scheduler dropped: they could no longer meet their deadline (``scheduler.py``)."""
    late_in: int = 0
    """Inputs that entered the engine after their deadline (the scheduler's misses)."""
    shared_chunks: int = 0
    """Chunks that ran in DiT forwards shared with other sessions (session batching)."""
    bad_frames: int = 0
    stage_ms: dict[str, float] = field(default_factory=dict)
    push_ms: float = 0.0
    _in_times: deque[int] = field(default_factory=lambda: deque(maxlen=4096))
    _out_times: deque[int] = field(default_factory=lambda: deque(maxlen=4096))
    _latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=512))
    _intervals_ms: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    """frame_out runs on the output thread, snapshot on the compute thread."""

    def frame_in(self, now_ns: int) -> None:
        self.frames_in += 1
        self._in_times.append(now_ns)

    def frame_out(self, now_ns: int, latency_ns: int, late: bool) -> None:
        with self._lock:
            if self._out_times:
                self._intervals_ms.append((now_ns - self._out_times[-1]) / 1e6)
            self.frames_out += 1
            self._out_times.append(now_ns)
            self._latency_ms.append(latency_ns / 1e6)
            if late:
                self.deadline_misses += 1

    def engine_step(self, push_ms: float, stage_ms: Mapping[str, float] | None, outputs: int) -> None:
        self.push_ms = push_ms
        self.engine_outputs += outputs
        if stage_ms:
            self.stage_ms = {k: round(float(v), 3) for k, v in stage_ms.items()}

    def snapshot(self, now_ns: int) -> CounterSnapshot:
        with self._lock:
            lat = np.asarray(self._latency_ms, dtype=np.float64)[-_LATENCY_SAMPLES:]
            p50, p95, p99 = np.percentile(lat, [50, 95, 99]).round(2).tolist() if lat.size else (None, None, None)
            iv = np.asarray(self._intervals_ms, dtype=np.float64)[-64:]
            return CounterSnapshot(
                fps_in=round(_rate(self._in_times, now_ns), 2),
                fps_out=round(_rate(self._out_times, now_ns), 2),
                frames_in=self.frames_in,
                frames_out=self.frames_out,
                latency_ms_p50=p50,
                latency_ms_p95=p95,
                latency_ms_p99=p99,
                jitter_ms=round(float(iv.std()), 2) if iv.size >= 2 else None,
                deadline_misses=self.deadline_misses,
                dropped_late=self.dropped_late,
                late_in=self.late_in,
                shared_chunks=self.shared_chunks,
                bad_frames=self.bad_frames,
                push_ms=round(self.push_ms, 3),
                stage_ms=dict(self.stage_ms),
            )


def device_memory_mb(device: str | None) -> dict[str, float | None]:
    """Memory the model side holds: CUDA allocated/reserved on a GPU; the process RSS on CPU."""
    out: dict[str, float | None] = {"rss_mb": None, "allocated_mb": None, "reserved_mb": None}
    try:
        with open("/proc/self/statm") as fh:
            out["rss_mb"] = round(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        try:
            import resource

            out["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        except (ImportError, OSError):
            pass
    if device and device.startswith("cuda"):
        try:
            import torch

            out["allocated_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
            out["reserved_mb"] = round(torch.cuda.memory_reserved(device) / 2**20, 1)
        except Exception:  # noqa: BLE001 - stats must never break the loop
            pass
    return out
