"""How a session's frames travel: one class per kind, shared memory (:class:`ShmTransport`) or the network
(:class:`NetTransport`), behind one interface (:class:`FrameTransport`) so the session never branches on the kind.

``take`` runs on the compute loop, ``deliver`` on the output thread (under its lock), ``close`` on the compute loop
while holding that lock. A transport that can no longer be used raises :class:`SessionClosed` (``take``,
``check``) or :class:`TransportError` (``deliver``); the loop closes that session only.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

import numpy as np

from ..protocol.constants import PIXEL_FORMATS
from ..protocol.messages import NetEndpoints, ring_name
from ..protocol.ring import FrameRing, RingError, ring_path
from .items import NetCounters, NetDetach, NetOutput, OutboundItem

log = logging.getLogger(__name__)

_ARRIVAL_CLOCK_NS = 5 * 10**9
"""A capture timestamp at most this old is taken as the frame's arrival for pacing (same clock, same machine)."""


class SessionClosed(Exception):
    """The session must be closed: ``reason`` says why (published as an event), ``code`` the error code if any."""

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class TransportError(Exception):
    """An output could not be delivered; the session is closed with this message."""


class InputFrame(NamedTuple):
    """One input frame: ``H×W×C`` uint8 pixels, the client's capture time and when the daemon took it in."""

    pixels: np.ndarray
    capture_ns: int
    arrival_ns: int


class FrameTransport(Protocol):
    """What a session needs from the way its frames travel."""

    kind: Literal["shm", "net"]

    def take(self) -> InputFrame | None:
        """The next input frame, in order, or None."""

    def has_input(self) -> bool: ...

    def polled(self) -> bool:
        """True when new input does not wake the compute loop (shared memory): the loop polls for it."""

    def deliver(self, seq: int, pixels: np.ndarray, capture_ns: int) -> None:
        """Send one output (``seq`` counts outputs from 1); raises TransportError."""

    def check(self) -> None:
        """Raise SessionClosed when the transport is corrupt or the client let go of it."""

    def client_heartbeat_ns(self) -> int:
        """The newest sign of life the client left in the transport itself (0: none)."""

    def ring_names(self) -> tuple[str | None, str | None]:
        """The shared-memory rings the client writes and reads (``None, None``: no rings)."""

    def dropped_in(self) -> int: ...

    def dropped_out(self) -> int: ...

    def close(self) -> None: ...


# ====================================================================================================== shm


class ShmTransport:
    """Two shared-memory rings (``ring.py``): the client writes the input ring, the daemon writes the output ring.

    The daemon opens both ``safe=True``: it touches their memory only through ``pread``/``pwrite``, so a client
    that truncates, deletes or scribbles over a ring makes that session close with a clear reason (``take``,
    ``deliver`` and the periodic ``check`` raise), never a SIGBUS that would take every session down.
    """

    kind: Literal["shm", "net"] = "shm"

    def __init__(self, in_ring: FrameRing, out_ring: FrameRing) -> None:
        self.in_ring = in_ring
        self.out_ring = out_ring
        self._shape = (in_ring.height, in_ring.width, in_ring.channels)

    @classmethod
    def create(cls, session_id: str, *, width: int, height: int, pixel_format: str, slots: int) -> ShmTransport:
        """Create the session's rings (raises RingError / OSError)."""
        in_ring = FrameRing.create(
            ring_name(session_id, "in"), width=width, height=height, pixel_format=pixel_format, slots=slots, safe=True
        )
        try:
            out_ring = FrameRing.create(
                ring_name(session_id, "out"), width=width, height=height, pixel_format=pixel_format, slots=slots,
                safe=True,
            )
        except BaseException:
            in_ring.unlink()
            in_ring.close()
            raise
        # The daemon is the consumer of the input and the producer of the output: show life on both from the start.
        in_ring.beat("consumer")
        out_ring.beat("producer")
        return cls(in_ring, out_ring)

    def take(self) -> InputFrame | None:
        pixels = np.empty(self._shape, np.uint8)
        try:
            frame = self.in_ring.read_next(out=pixels.reshape(-1))
        except (RingError, ValueError, OSError) as exc:
            raise SessionClosed(f"input ring unusable: {exc}", "internal") from exc
        if frame is None:
            return None
        now = time.monotonic_ns()
        # Pace from the capture time when it is this machine's monotonic clock (it is, for shared memory, unless the
        # client made its own timestamps): frames are read in bursts between model steps, but were captured evenly.
        arrival = frame.timestamp_ns if 0 <= now - frame.timestamp_ns < _ARRIVAL_CLOCK_NS else now
        return InputFrame(pixels, frame.timestamp_ns, arrival)

    def has_input(self) -> bool:
        try:
            return self.in_ring.pending > 0
        except (RingError, ValueError, OSError):
            return True  # let take() report it

    def polled(self) -> bool:
        return True

    def deliver(self, seq: int, pixels: np.ndarray, capture_ns: int) -> None:
        try:
            self.out_ring.write(np.ascontiguousarray(pixels), timestamp_ns=capture_ns)
        except (RingError, ValueError, OSError) as exc:
            raise TransportError(f"output ring unusable: {exc}") from exc

    def check(self) -> None:
        """Each ring's file must still be the one the daemon made, at its size, with its header intact
        (``FrameRing.verify``); counters that went backwards are corruption too."""
        for ring, direction in ((self.in_ring, "input"), (self.out_ring, "output")):
            try:
                ring.verify_file()
            except (RingError, OSError) as exc:
                raise SessionClosed(f"{direction} ring unusable: {exc}", "internal") from exc
            try:
                ring.verify_header()
                written = ring.written
                closed = ring.closed_flag
            except (RingError, OSError) as exc:
                raise SessionClosed(f"{direction} ring header is corrupt: {exc}", "internal") from exc
            if direction == "input" and written < ring.read:
                raise SessionClosed(
                    f"input ring header is corrupt: write_count {written} went below frames already read {ring.read}",
                    "internal",
                )
            if closed:
                raise SessionClosed("the client closed the session in the ring")

    def ring_names(self) -> tuple[str | None, str | None]:
        return self.in_ring.name, self.out_ring.name

    def client_heartbeat_ns(self) -> int:
        try:
            return max(self.in_ring.control().producer_heartbeat_ns, self.out_ring.control().consumer_heartbeat_ns)
        except (RingError, ValueError, OSError):
            return 0

    def dropped_in(self) -> int:
        return self.in_ring.dropped

    def dropped_out(self) -> int:
        try:
            return self.out_ring.header_counters()[2]
        except (RingError, ValueError, OSError):
            return 0

    def close(self) -> None:
        """Mark the rings closed for the client, unlink and unmap them (idempotent)."""
        for ring in (self.in_ring, self.out_ring):
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


def sweep_stale_rings(*, min_age_s: float = 10.0) -> list[str]:
    """Unlink rings (``sdlive-<id>-in|out``) whose creating daemon is gone: a daemon killed with SIGKILL cannot
    unlink its own. A ring of a live process is never touched; an unreadable one only once it is ``min_age_s`` old
    (a ring being created right now has no magic yet), and never while either side's heartbeat is recent. Returns
    the names removed."""
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
            pid: int | None
            try:
                ring = FrameRing.open(name, observer=True, safe=True)  # another process's file: never mapped loads
            except RingError:
                if now - st.st_mtime < min_age_s:
                    continue
                pid = None
            else:
                pid = ring.creator_pid
                try:
                    # A creator in another PID namespace looks dead from here: its rings still show life.
                    quiet = min(ring.heartbeat_age_s("producer"), ring.heartbeat_age_s("consumer")) > min_age_s
                except RingError:
                    quiet = now - st.st_mtime >= min_age_s  # shrank since it was opened: judge it by its age
                finally:
                    ring.close()
                if not quiet:
                    continue
            if pid == os.getpid() or (pid is not None and _pid_alive(pid)):
                continue
            os.unlink(path)
            removed.append(name)
        except OSError:
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ====================================================================================================== net


class NetTransport:
    """ZeroMQ PULL/PUSH sockets the IO thread owns: it puts received frames in :meth:`received`, and sends what
    :meth:`deliver` hands it. The inbox holds ``slots`` frames like a ring: a client faster than the engine loses
    its oldest frames, counted as drops."""

    kind: Literal["shm", "net"] = "net"

    def __init__(
        self,
        session_id: str,
        endpoints: NetEndpoints,
        *,
        pixel_format: str,
        slots: int,
        counters: NetCounters,
        send: Callable[[OutboundItem], None],
        jpeg_quality: int = 85,
    ) -> None:
        if pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"unknown pixel format {pixel_format!r}")
        self.session_id = session_id
        self.endpoints = endpoints
        self.pixel_format = pixel_format
        self.slots = slots
        self.counters = counters
        self.jpeg_quality = jpeg_quality
        self._send = send
        self._inbox: deque[InputFrame] = deque()
        self._dropped_in = 0

    def received(self, frame: InputFrame) -> None:
        """A frame from the IO thread (compute loop side)."""
        if len(self._inbox) >= self.slots:
            self._inbox.popleft()
            self._dropped_in += 1
        self._inbox.append(frame)

    def take(self) -> InputFrame | None:
        return self._inbox.popleft() if self._inbox else None

    def has_input(self) -> bool:
        return bool(self._inbox)

    def polled(self) -> bool:
        return False

    def deliver(self, seq: int, pixels: np.ndarray, capture_ns: int) -> None:
        self._send(
            NetOutput(
                self.session_id, seq, capture_ns, pixels, self.pixel_format, self.endpoints.encoding, self.jpeg_quality
            )
        )

    def check(self) -> None:
        return None

    def client_heartbeat_ns(self) -> int:
        return 0  # frames and control messages count, through the session directory

    def ring_names(self) -> tuple[str | None, str | None]:
        return None, None

    def dropped_in(self) -> int:
        return self._dropped_in

    def dropped_out(self) -> int:
        return self.counters.sent_dropped

    def close(self) -> None:
        self._inbox.clear()
        self._send(NetDetach(self.session_id))
