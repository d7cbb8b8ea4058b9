"""How long each stage of a chunk took, measured without making the host wait for the device.

On the CPU the marks are ``time.perf_counter()`` readings (the work is done when the call returns). On CUDA they
are timing events recorded on the stream: the times are read once the chunk's last event has completed (asked with
``Event.query()``, which never blocks), so until then :meth:`StageClock.times` still gives the chunk before's. This
replaces a ``torch.cuda.synchronize`` between stages, which stalled the host three times per chunk.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .interface import StageTimes

__all__ = ["StageClock"]

STAGES = ("encode", "dit", "decode")


class StageClock:
    """``start()``, then ``mark()`` after each of :data:`STAGES`; :meth:`times` gives the last measured chunk's."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list[Any] = []
        self._last = StageTimes()

    def _now(self) -> Any:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """The chunk begins (its first stage)."""
        self._marks = [self._now()]

    def mark(self) -> None:
        """One stage ended."""
        self._marks.append(self._now())

    def times(self) -> StageTimes:
        """Milliseconds per stage of the last chunk whose marks are all in (and, on CUDA, done)."""
        marks = self._marks
        if len(marks) == len(STAGES) + 1 and (not self._cuda or marks[-1].query()):
            if self._cuda:
                ms = [a.elapsed_time(b) for a, b in zip(marks[:-1], marks[1:], strict=True)]
            else:
                ms = [(b - a) * 1e3 for a, b in zip(marks[:-1], marks[1:], strict=True)]
            self._last = StageTimes(**dict(zip(STAGES, ms, strict=True)))
            self._marks = []
        return self._last
