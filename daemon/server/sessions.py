"""Sessions: one client stream each, with its engine session, its frame transport, its pacer and its counters.

Runs on the compute thread only. A session reads its inputs from the input ring (or from the network inbox the IO
thread fills), pushes them through its engine session, and hands the outputs to its pacer, which lets them leave at
the source rate: written to the output ring with the input's capture timestamp (or sent back over the network).

Liveness (Paranoid Pirate): any control message naming the session, any network frame, and the client's in-band
heartbeats in the rings (producer side of the input ring, consumer side of the output ring) count as life; a session
silent for ``liveness × interval`` is closed and its shared memory unlinked.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..protocol.messages import ring_name
from ..protocol.ring import FrameRing, RingError, ring_path
from .pacing import Pacer
from .slo import SloGuard
from .stats import SessionStats

log = logging.getLogger(__name__)

CHANNELS = {"bgra": 4, "rgba": 4, "rgb24": 3, "bgr24": 3}
_ARRIVAL_CLOCK_NS = 5 * 10**9
"""A capture timestamp at most this old is taken as the frame's arrival for pacing (same clock, same machine)."""
_PLAUSIBLE_CLOCK_NS = 60 * 10**9
"""A capture timestamp within this of the daemon's monotonic clock is taken to share it (same machine)."""


class SessionClosed(Exception):
    """The session must be closed: ``reason`` says why (published as an event), ``code`` the error code if any."""

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def sweep_stale_rings(*, min_age_s: float = 10.0) -> list[str]:
    """Unlink rings (``sdlive-<id>-in|out``) whose creating daemon is gone: a daemon killed with SIGKILL cannot
    unlink its own. A ring of a live process is never touched; an unreadable one only once it is ``min_age_s`` old
    (a ring being created right now has no magic yet), and never while either side's heartbeat is recent. Returns
    the names removed."""
    import os
    import re

    directory = os.path.dirname(ring_path("probe"))
    pattern = re.compile(r"^sdlive-[A-Za-z0-9_-]+-(in|out)$")
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not pattern.match(name):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
            if st.st_uid != os.getuid():
                continue
            try:
                ring = FrameRing.open(name, observer=True)
            except RingError:
                if now - st.st_mtime < min_age_s:
                    continue
                pid = None
            else:
                pid = ring.creator_pid
                # A creator in another PID namespace looks dead from here: its rings still show life.
                quiet = min(ring.heartbeat_age_s("producer"), ring.heartbeat_age_s("consumer")) > min_age_s
                ring.close()
                if not quiet:
                    continue
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                continue
            if pid == os.getpid():
                continue
            os.unlink(path)
            removed.append(name)
        except OSError:
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_session_id() -> str:
    return secrets.token_hex(6)


@dataclass
class Output:
    """One restyled frame scheduled to leave at ``due_ns``."""

    session: Session
    index: int
    pixels: np.ndarray
    capture_ns: int
    arrival_ns: int
    due_ns: int
    late: bool


@dataclass
class Session:
    """One open session (compute thread only)."""

    session_id: str
    width: int
    height: int
    fps: float
    pixel_format: str
    transport: str
    client: str | None
    engine_session: Any
    preset: str | None
    ring_slots: int
    encoding: str = "raw"
    jpeg_quality: int = 85
    in_ring: FrameRing | None = None
    out_ring: FrameRing | None = None
    net_input: str | None = None
    net_output: str | None = None
    opened_ns: int = field(default_factory=time.monotonic_ns)
    last_seen_ns: int = field(default_factory=time.monotonic_ns)
    stats: SessionStats = field(init=False)
    pacer: Pacer = field(init=False)
    inbox: deque[tuple[int, int, np.ndarray, int]] = field(init=False)
    _captures: dict[int, tuple[int, int]] = field(default_factory=dict)
    _pushed: int = 0
    _out_seq: int = 0
    _net_dropped: int = 0
    failed: str | None = None
    """Set by the output thread when this session's output cannot be written; the compute loop closes it."""
    closed: bool = False

    def __post_init__(self) -> None:
        self.prefers_stream_batch = bool(self.engine_session.params.stream_batch)
        self.slo = SloGuard()
        self.stats = SessionStats(fps_target=self.fps)
        self.pacer = Pacer(self.fps)
        self.inbox = deque()
        self._shape = (self.height, self.width, CHANNELS[self.pixel_format])

    # ------------------------------------------------------------------ transport

    @classmethod
    def create_rings(cls, session_id: str, *, width: int, height: int, pixel_format: str, slots: int) -> tuple[FrameRing, FrameRing]:
        in_ring = FrameRing.create(ring_name(session_id, "in"), width=width, height=height, pixel_format=pixel_format, slots=slots)
        try:
            out_ring = FrameRing.create(
                ring_name(session_id, "out"), width=width, height=height, pixel_format=pixel_format, slots=slots
            )
        except BaseException:
            in_ring.unlink()
            in_ring.close()
            raise
        # The daemon is the consumer of the input and the producer of the output: show life on both from the start.
        in_ring.beat("consumer")
        out_ring.beat("producer")
        return in_ring, out_ring

    @property
    def latency_frames(self) -> int:
        return int(self.engine_session.latency_frames)

    @property
    def frames_pushed(self) -> int:
        return self._pushed

    def params(self) -> dict[str, Any]:
        return self.engine_session.params.model_dump()

    def seen(self, now_ns: int | None = None) -> None:
        self.last_seen_ns = max(self.last_seen_ns, now_ns if now_ns is not None else time.monotonic_ns())

    def client_age_s(self, now_ns: int) -> float:
        """Seconds since the client's last sign of life (control message, net frame or in-band ring heartbeat)."""
        newest = self.last_seen_ns
        try:
            if self.in_ring is not None:
                newest = max(newest, self.in_ring.control().producer_heartbeat_ns)
            if self.out_ring is not None:
                newest = max(newest, self.out_ring.control().consumer_heartbeat_ns)
        except RingError:
            pass
        return max(0.0, (now_ns - newest) / 1e9)

    def take_input(self) -> tuple[np.ndarray, int, int] | None:
        """The next input frame, in order: ``(pixels, capture_ns, arrival_ns)``, or None."""
        if self.in_ring is not None:
            pixels = np.empty(self._shape, np.uint8)
            try:
                frame = self.in_ring.read_next(out=pixels.reshape(-1))
            except (RingError, ValueError, OSError) as exc:
                raise SessionClosed(f"input ring unusable: {exc}", "internal") from exc
            self.stats.dropped_in = self.in_ring.dropped + self._net_dropped
            if frame is None:
                return None
            now = time.monotonic_ns()
            # Pace from the capture time when it is this machine's monotonic clock (it is, for shared memory, unless
            # the client made its own timestamps): frames are read in bursts between model steps, captured evenly.
            arrival = frame.timestamp_ns if 0 <= now - frame.timestamp_ns < _ARRIVAL_CLOCK_NS else now
            return pixels, frame.timestamp_ns, arrival
        if self.inbox:
            _seq, capture_ns, pixels, arrival_ns = self.inbox.popleft()
            return pixels, capture_ns, arrival_ns
        return None

    def net_received(self, seq: int, capture_ns: int, pixels: np.ndarray, arrival_ns: int) -> None:
        """A network frame for this session (from the IO thread). The inbox holds ``ring_slots`` frames like a ring:
        a client faster than the engine loses its oldest frames, counted as drops."""
        self.seen(arrival_ns)
        if len(self.inbox) >= self.ring_slots:
            self.inbox.popleft()
            self._net_dropped += 1
            self.stats.dropped_in = self._net_dropped
        self.inbox.append((seq, capture_ns, pixels, arrival_ns))

    def has_input(self) -> bool:
        if self.in_ring is not None:
            try:
                return self.in_ring.pending > 0
            except (RingError, ValueError):
                return True  # let take_input report it
        return bool(self.inbox)

    # ------------------------------------------------------------------ engine

    def push(self, pixels: np.ndarray, capture_ns: int, arrival_ns: int) -> list[Output]:
        """Push one input frame; returns the outputs that became ready, each with its due time."""
        index = self._pushed
        self._guard_slo(arrival_ns)
        started = time.perf_counter()
        outputs = self.engine_session.push(pixels)  # ValueError: bad frame (the caller counts it)
        push_ms = (time.perf_counter() - started) * 1e3
        self._pushed += 1
        self.stats.frame_in(arrival_ns)
        self._captures[index] = (capture_ns, arrival_ns)
        ready_ns = time.monotonic_ns()
        self.stats.engine_step(push_ms, getattr(self.engine_session, "stage_ms", None), len(outputs))
        scheduled = []
        for out in outputs:
            capture, arrival = self._captures.pop(out.index, (capture_ns, arrival_ns))
            due, late = self.pacer.schedule(arrival_ns=arrival, ready_ns=ready_ns)
            scheduled.append(Output(self, out.index, out.pixels, capture, arrival, due, late))
        if len(self._captures) > 4096:  # outputs the engine will never give (cannot happen; stay bounded anyway)
            for stale in sorted(self._captures)[:-1024]:
                del self._captures[stale]
        return scheduled

    def _guard_slo(self, arrival_ns: int) -> None:
        """Fall back to no-batch mode while frames wait too long, back to the stream batch when calm (``slo.py``)."""
        now = time.monotonic_ns()
        params = self.engine_session.params
        wants = self.prefers_stream_batch and params.steps > 1
        switch = self.slo.observe(wait_s=(now - arrival_ns) / 1e9, now_s=now / 1e9, wants_stream_batch=wants)
        if switch is not None and switch != params.stream_batch:
            self.engine_session.set_params(stream_batch=switch)  # drains the pipeline: no frame is lost
            what = "stream batch again (waits back under the SLO)" if switch else "no-batch mode (frames waited >= SLO)"
            log.info("session %s: %s", self.session_id, what)

    # ------------------------------------------------------------------ output (output thread)

    def emit(self, out: Output, send_net: Any) -> None:
        """Write one due output to the output ring (or hand it to the network). Runs on the output thread, under
        its lock; a failure marks the session ``failed`` for the compute loop to close."""
        if self.closed or self.failed:
            return
        self._out_seq += 1
        if self.out_ring is not None:
            try:
                self.out_ring.write(np.ascontiguousarray(out.pixels), timestamp_ns=out.capture_ns)
                self.stats.dropped_out = self.out_ring.header_counters()[2]
            except (RingError, ValueError, OSError) as exc:
                self.failed = f"output ring unusable: {exc}"
                return
        else:
            send_net(self, self._out_seq, out)
        now = time.monotonic_ns()
        since = out.capture_ns if 0 <= now - out.capture_ns < _PLAUSIBLE_CLOCK_NS else out.arrival_ns
        self.stats.frame_out(now, now - since, out.late)

    # ------------------------------------------------------------------ checks

    def check_rings(self) -> None:
        """Raise :class:`SessionClosed` when a ring's header is corrupt or the client marked the session closed.

        The header is re-validated by opening the ring afresh (``FrameRing.open`` checks magic, version, geometry
        and sizes) and comparing its geometry with ours; counters that went backwards are corruption too."""
        for ring, direction in ((self.in_ring, "input"), (self.out_ring, "output")):
            if ring is None:
                continue
            try:
                probe = FrameRing.open(ring.name, observer=True)
            except (RingError, OSError) as exc:
                raise SessionClosed(f"{direction} ring header is corrupt: {exc}", "internal") from exc
            try:
                geometry = (probe.width, probe.height, probe.pixel_format, probe.slots, probe.frame_size)
                expected = (ring.width, ring.height, ring.pixel_format, ring.slots, ring.frame_size)
                written = probe.written
            finally:
                probe.close()
            if geometry != expected:
                raise SessionClosed(
                    f"{direction} ring header is corrupt: geometry changed from {expected} to {geometry}", "internal"
                )
            if direction == "input" and written < ring.read:
                raise SessionClosed(
                    f"input ring header is corrupt: write_count {written} went below frames already read {ring.read}",
                    "internal",
                )
            if ring.closed_flag:
                raise SessionClosed("the client closed the session in the ring")

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Mark the rings closed for the client, unlink and unmap them (idempotent). Hold the output thread's lock."""
        self.closed = True
        for ring in (self.in_ring, self.out_ring):
            if ring is None:
                continue
            try:
                if ring.is_open:
                    ring.mark_closed()
            except (RingError, ValueError, OSError):
                pass
            try:
                ring.unlink()
            except OSError as exc:
                log.warning("could not unlink ring %s: %s", ring.name, exc)
            ring.close()
        self.inbox.clear()
        self._captures.clear()

    def describe(self) -> dict[str, Any]:
        """The session's identity (status replies, events)."""
        return {
            "session_id": self.session_id,
            "client": self.client,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "pixel_format": self.pixel_format,
            "transport": self.transport,
            "input_ring": self.in_ring.name if self.in_ring is not None else None,
            "output_ring": self.out_ring.name if self.out_ring is not None else None,
            "latency_frames": self.latency_frames,
            "preset": self.preset,
            "uptime_s": round((time.monotonic_ns() - self.opened_ns) / 1e9, 2),
        }
