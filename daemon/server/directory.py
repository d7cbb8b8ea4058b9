"""The open sessions as the IO thread sees them: shared by the IO thread and the compute loop, under one lock.

The compute loop adds a session once it is open and removes it when it closes. The IO thread answers heartbeats,
``set_preset`` and ``set_params`` from it without waiting for the loop (which may be inside a long model step):
it checks the session exists, validates the change against the session's *planned* parameters (those it will have
once every queued change applies) and records any sign of the client's life.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from ..protocol.params import GenerationParams


@dataclass
class _Entry:
    planned: GenerationParams
    preset: str | None
    last_seen_ns: int


class SessionDirectory:
    """Session id → planned parameters, preset and the client's last sign of life. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def add(self, session_id: str, params: GenerationParams, preset: str | None) -> None:
        with self._lock:
            self._entries[session_id] = _Entry(params.model_copy(), preset, time.monotonic_ns())

    def remove(self, session_id: str) -> None:
        with self._lock:
            self._entries.pop(session_id, None)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            return session_id in self._entries

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def seen(self, session_id: str, now_ns: int) -> None:
        """Any message naming the session, or any frame from it, counts as life."""
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is not None and now_ns > entry.last_seen_ns:
                entry.last_seen_ns = now_ns

    def last_seen_ns(self, session_id: str) -> int:
        with self._lock:
            entry = self._entries.get(session_id)
            return entry.last_seen_ns if entry is not None else 0

    def plan(self, session_id: str, changes: dict[str, Any], preset: str | None) -> GenerationParams:
        """The parameters after ``changes`` (and the queued ones before it), which become the planned ones.

        Raises KeyError for a session that is not open and pydantic's ValidationError for a bad combination;
        then nothing changes."""
        with self._lock:
            entry = self._entries[session_id]
            planned = GenerationParams.model_validate({**entry.planned.model_dump(), **changes})
            entry.planned = planned
            if preset is not None:
                entry.preset = preset
            return planned.model_copy()

    def reset(self, session_id: str, params: GenerationParams, preset: str | None) -> None:
        """The compute loop could not apply a change: plan from what the session really runs with again."""
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is not None:
                entry.planned = params.model_copy()
                entry.preset = preset
