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
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Literal, NamedTuple, Protocol

import numpy as np

from ..protocol.constants import PIXEL_FORMATS
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.messages import TOPIC_EVENT, Event, NetEndpoints, OpenSessionRequest, ring_name
from ..protocol.netframe import NetFrameError, NetFrameHeader, decode_payload
from ..protocol.ring import FrameRing, RingError, RingSpaceError, ring_path
from .items import NetAttach, NetCounters, NetDetach, NetOutput, OutboundItem, Publish
from .pacing import MAX_QUEUE_LIMIT

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

    def has_room(self) -> bool:
        """True when an output delivered now would not overrun the reader (offline sessions wait for it)."""

    def check(self) -> None:
        """Raise SessionClosed when the transport is corrupt or the client let go of it."""

    def client_heartbeat_ns(self) -> int:
        """The newest sign of life the client left in the transport itself (0: none)."""

    def ring_names(self) -> tuple[str | None, str | None]:
        """The shared-memory rings the client writes and reads (``None, None``: no rings)."""

    def dropped_in(self) -> int: ...

    def dropped_out(self) -> int: ...

    def unreported_bad_frames(self) -> int:
        """Bad frames counted by the transport but not reported to the session one by one (floods)."""

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

    def has_room(self) -> bool:
        try:
            written, read, _dropped = self.out_ring.header_counters()
        except (RingError, ValueError, OSError):
            return True  # let deliver() report it
        return written - read < self.out_ring.slots

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

    def unreported_bad_frames(self) -> int:
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


class BadInput(Exception):
    """One input frame the transport refuses (it could not be decoded); the session counts it and goes on."""


class _Pending(NamedTuple):
    header: NetFrameHeader
    payload: memoryview
    received_ns: int


REFUSAL_REPORT_INTERVAL_NS = 100_000_000
"""A network session's refused frames are reported (an ``error`` event) at most this often."""


class NetLink(NetCounters):
    """What the IO thread and the compute loop share for one network session: the frames the IO thread received
    and checked (``netframe.check_frame``: nothing decoded yet), at most ``capacity`` of them, newest wins (the
    oldest waiting frame is dropped and counted in ``dropped_in``), and the counters both sides report.

    The IO thread calls :meth:`put`; when it returns True the compute loop may be asleep and is woken with a
    :data:`NET_WAKE` item. The compute loop calls :meth:`take`. Frames never pile up on the loop's inbox, however
    long the model runs.
    """

    def __init__(self, *, width: int, height: int, pixel_format: str, capacity: int) -> None:
        super().__init__()
        self.width = width
        self.height = height
        self.pixel_format = pixel_format
        self.capacity = max(1, capacity)
        self.received = 0
        """Frames accepted (checked and queued); IO thread."""
        self.dropped_in = 0
        """Frames dropped because ``capacity`` were already waiting (newest wins)."""
        self.refused = 0
        """Frames the IO thread refused (malformed, not the session's size …); IO thread."""
        self.refusals_reported = 0
        """Of those, the ones reported to the compute loop (a ``NetInputError`` each, counted there)."""
        self._last_report_ns = -REFUSAL_REPORT_INTERVAL_NS
        self._waiting: deque[_Pending] = deque()
        self._lock = threading.Lock()

    def refuse(self, now_ns: int) -> bool:
        """Count one refused frame (IO thread); True when it should be reported: the first, then at most one per
        ``REFUSAL_REPORT_INTERVAL_NS``, so a flood of bad frames cannot pile reports up on the compute loop's
        inbox. The unreported ones still count in ``bad_frames`` (``unreported_refusals``)."""
        self.refused += 1
        if now_ns - self._last_report_ns < REFUSAL_REPORT_INTERVAL_NS:
            return False
        self._last_report_ns = now_ns
        self.refusals_reported += 1
        return True

    def unreported_refusals(self) -> int:
        return self.refused - self.refusals_reported

    def put(self, header: NetFrameHeader, payload: memoryview, received_ns: int) -> bool:
        """Queue one checked frame (IO thread); True when the queue was empty (wake the compute loop)."""
        with self._lock:
            was_empty = not self._waiting
            if len(self._waiting) >= self.capacity:
                self._waiting.popleft()
                self.dropped_in += 1
            self._waiting.append(_Pending(header, payload, received_ns))
            self.received += 1
            return was_empty

    def take(self) -> _Pending | None:
        with self._lock:
            return self._waiting.popleft() if self._waiting else None

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def clear(self) -> None:
        with self._lock:
            self._waiting.clear()


NET_WAKE = np.empty((0, 0, 0), np.uint8)
"""The pixels of a ``NetInput`` that only wakes the compute loop: the frames themselves wait in the NetLink."""


class NetTransport:
    """ZeroMQ PULL/PUSH sockets the IO thread owns: it checks received frames and queues them in the session's
    :class:`NetLink` (bounded, newest wins); :meth:`take` decodes them here, on the compute loop, never on the IO
    thread that answers every client. :meth:`deliver` hands outputs to the IO thread to send."""

    kind: Literal["shm", "net"] = "net"

    def __init__(
        self,
        session_id: str,
        endpoints: NetEndpoints,
        *,
        pixel_format: str,
        slots: int,
        counters: NetLink,
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

    def received(self, frame: InputFrame) -> None:
        """A ``NetInput`` reached the compute loop: only a wake-up (:data:`NET_WAKE`); the frame is in the link."""
        if frame.pixels.size:
            raise ValueError("network frames travel in the session's NetLink, not on the inbox")

    def take(self) -> InputFrame | None:
        pending = self.counters.take()
        if pending is None:
            return None
        try:
            pixels = decode_payload(pending.header, pending.payload)
        except (NetFrameError, ValueError) as exc:
            message = f"bad network frame {pending.header.seq}: {exc}"
            self._send(Publish(TOPIC_EVENT, Event(event="error", session_id=self.session_id, code="bad_request",
                                                  message=message)))  # fmt: skip
            raise BadInput(message) from exc
        return InputFrame(pixels, int(pending.header.timestamp_ns), pending.received_ns)

    def has_input(self) -> bool:
        return self.counters.waiting() > 0

    def polled(self) -> bool:
        return False

    def deliver(self, seq: int, pixels: np.ndarray, capture_ns: int) -> None:
        self._send(
            NetOutput(
                self.session_id, seq, capture_ns, pixels, self.pixel_format, self.endpoints.encoding, self.jpeg_quality
            )
        )

    def has_room(self) -> bool:
        return True  # the output socket's high-water mark is the bound; a full one counts a drop

    def check(self) -> None:
        return None

    def client_heartbeat_ns(self) -> int:
        return 0  # frames and control messages count, through the session directory

    def ring_names(self) -> tuple[str | None, str | None]:
        return None, None

    def dropped_in(self) -> int:
        return self.counters.dropped_in

    def dropped_out(self) -> int:
        return self.counters.sent_dropped

    def unreported_bad_frames(self) -> int:
        return self.counters.unreported_refusals()

    def close(self) -> None:
        self.counters.clear()
        self._send(NetDetach(self.session_id))


# ================================================================================================ opening


NET_QUEUE_FACTOR = 4
"""A network session's ZeroMQ queues (receive and send high-water marks) hold this many times its slots."""


def frame_memory_bytes(*, width: int, height: int, pixel_format: str, transport: str, slots: int) -> int:
    """The most memory one session's frames can hold at once: its two rings (allocated for real), or its
    network queues (the NetLink, ZeroMQ's receive and send queues), plus outputs waiting in the output thread."""
    frame = width * height * PIXEL_FORMATS[pixel_format].bytes_per_pixel
    waiting_outputs = MAX_QUEUE_LIMIT * frame
    if transport == "shm":
        return 2 * (256 + slots * (frame + 128)) + waiting_outputs
    per_message = frame + 65536  # the MAXMSGSIZE of the input socket
    return (slots + NET_QUEUE_FACTOR * slots) * per_message + NET_QUEUE_FACTOR * slots * frame + waiting_outputs


def machine_memory_bytes() -> int:
    """This machine's memory, or its container's limit (cgroup v2 ``memory.max``) when that is lower."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30  # a platform without sysconf (Windows): assume a modest machine
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def check_frame_memory(msg: OpenSessionRequest, *, slots: int, held: list[int], limit_mb: int | None) -> int:
    """The session's worst-case frame memory (:func:`frame_memory_bytes`), or a ``capacity`` ProtocolError when it,
    with what the open sessions may ``held``, is more than the daemon gives frames (``--frame-memory-mb``,
    default half of :func:`machine_memory_bytes`)."""
    need = frame_memory_bytes(width=msg.width, height=msg.height, pixel_format=msg.pixel_format,
                              transport=msg.transport, slots=slots)  # fmt: skip
    limit = limit_mb * 2**20 if limit_mb is not None else machine_memory_bytes() // 2
    others = sum(held)
    if need + others > limit:
        mib = 2**20
        raise ProtocolError(
            ErrorCode.CAPACITY,
            f"a {msg.width}x{msg.height} {msg.pixel_format} {msg.transport} session may hold up to {need / mib:.0f} "
            f"MiB of frames; the {len(held)} open session(s) may hold {others / mib:.0f} MiB of the {limit / mib:.0f} "
            "MiB the daemon gives frames: open a smaller session, close one, or start the daemon with a larger "
            "--frame-memory-mb (or fewer --ring-slots)",
        )
    return need


def open_transport(session_id: str, msg: OpenSessionRequest, *, slots: int, outbox_put: Callable[[OutboundItem], None],
                   bind_timeout_s: float) -> FrameTransport:  # fmt: skip
    """The session's transport, as ``open_session`` asked: raises ProtocolError (``capacity`` when the ring folder
    is too small, ``internal`` when the memory or the sockets cannot be had)."""
    if msg.transport == "shm":
        try:
            return ShmTransport.create(
                session_id, width=msg.width, height=msg.height, pixel_format=msg.pixel_format, slots=slots
            )
        except RingSpaceError as exc:
            raise ProtocolError(ErrorCode.CAPACITY, f"cannot create the session's shared memory: {exc}") from None
        except (RingError, OSError) as exc:
            raise ProtocolError(ErrorCode.INTERNAL, f"cannot create the session's shared memory: {exc}") from None
    link = NetLink(width=msg.width, height=msg.height, pixel_format=msg.pixel_format, capacity=slots)
    attach = NetAttach(session_id, msg.width, msg.height, msg.pixel_format, NET_QUEUE_FACTOR * slots, link)
    outbox_put(attach)
    try:
        endpoints = attach.bound.result(timeout=bind_timeout_s)
    except FutureTimeout:
        raise ProtocolError(ErrorCode.INTERNAL, "the IO thread did not bind the network frame sockets") from None
    except OSError as exc:
        raise ProtocolError(ErrorCode.INTERNAL, str(exc)) from None
    return NetTransport(
        session_id,
        endpoints.model_copy(update={"encoding": msg.encoding}),
        pixel_format=msg.pixel_format,
        slots=slots,
        counters=link,
        send=outbox_put,
    )
