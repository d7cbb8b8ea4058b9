"""The IO thread: it owns every ZeroMQ socket; the compute loop only sees two queues (vLLM's EngineCoreProc split).

Inbound, the thread decodes and authorises control requests itself, so a malformed, oversized, unknown or
unauthorised message is answered at once with an error reply, even while the compute loop is busy in the model,
and never reaches it. Good requests and network frames go on the inbound queue as :class:`Request` /
:class:`NetInput` items.

Outbound, the compute loop puts :class:`Reply`, :class:`Publish`, :class:`NetOutput` (and socket hand-overs) on the
:class:`Outbox`, which wakes this thread through an inproc PAIR socket; the same PAIR carries the stop message.

Startup is a READY handshake: :meth:`IOThread.start_and_wait` returns once every socket is bound, or raises the
bind error (address in use, bad interface) with the fix.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.messages import authorize, decode_request, error_reply, ok_reply

log = logging.getLogger(__name__)

_WAKE = b"w"
_STOP = b"s"
MAX_WIRE_BYTES = 32 * 2**20
"""ZeroMQ drops a peer that sends more than this in one message (memory guard); up to it, anything over the
protocol's 64 KiB limit gets a ``too_large`` reply."""


# ------------------------------------------------------------------------------------------------ queue items


@dataclass
class Request:
    """A decoded, authorised control request for the compute loop."""

    envelope: list[bytes]
    message: Any  # a protocol.messages request model
    received_ns: int


@dataclass
class NetInput:
    """A frame received on a network session's input socket."""

    session_id: str
    seq: int
    timestamp_ns: int
    pixels: np.ndarray
    received_ns: int


@dataclass
class NetInputError:
    session_id: str
    message: str


@dataclass
class Shutdown:
    reason: str


@dataclass
class IOFailed:
    reason: str


@dataclass
class Reply:
    envelope: list[bytes]
    body: dict[str, Any] | None = None
    error: ProtocolError | None = None


@dataclass
class Publish:
    topic: str
    body: dict[str, Any]


@dataclass
class NetOutput:
    session_id: str
    seq: int
    timestamp_ns: int
    pixels: np.ndarray
    pixel_format: str
    encoding: str
    quality: int


@dataclass
class NetAttach:
    """Hand a network session's bound sockets over to the IO thread."""

    session_id: str
    pull: zmq.Socket
    push: zmq.Socket
    width: int
    height: int
    pixel_format: str


@dataclass
class NetDetach:
    session_id: str


@dataclass
class _NetSession:
    pull: zmq.Socket
    push: zmq.Socket
    width: int
    height: int
    pixel_format: str
    sent_dropped: int = 0


# ---------------------------------------------------------------------------------------------------- outbox


class Outbox:
    """What the compute loop (or a signal handler) hands to the IO thread: a queue plus an inproc wake-up."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wake = ctx.socket(zmq.PAIR)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.setsockopt(zmq.SNDHWM, 0)
        self._address = address
        self._connected = False
        self._closed = False

    def connect(self) -> None:
        self._wake.connect(self._address)
        self._connected = True

    def put(self, item: Any) -> None:
        self._queue.put(item)
        self._signal(_WAKE)

    def stop(self) -> None:
        self._signal(_STOP)

    def _signal(self, what: bytes) -> None:
        with self._lock:
            if self._connected and not self._closed:
                try:
                    self._wake.send(what, zmq.NOBLOCK)
                except zmq.Again:
                    pass  # the IO thread has a wake-up pending already

    def get_nowait(self) -> Any:
        return self._queue.get_nowait()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.close(linger=0)


# ------------------------------------------------------------------------------------------------- IO thread


class IOThread(threading.Thread):
    """Owns the ROUTER (control), the PUB (stats/events/daemon) and the network sessions' PULL/PUSH sockets."""

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        control: str,
        pub: str,
        token: str | None,
        inbox: queue.Queue[Any],
        max_message_bytes: int,
    ) -> None:
        super().__init__(name="sdlive-io", daemon=True)
        self.ctx = ctx
        self.control_address = control
        self.pub_address = pub
        self.token = token
        self.inbox = inbox
        self.max_message_bytes = max_message_bytes
        self._wake_address = f"inproc://sdlive-io-{id(self)}"
        self.outbox = Outbox(ctx, self._wake_address)
        self._ready: queue.Queue[BaseException | None] = queue.Queue()
        self._net: dict[str, _NetSession] = {}
        self._pull_index: dict[zmq.Socket, str] = {}
        self.bound_control = control
        self.bound_pub = pub
        self.counters = {"requests": 0, "rejected": 0}
        self.last_seen: dict[str, int] = {}
        """Session id → monotonic ns of the last message naming it or frame for it, written here as messages
        arrive, so a compute loop busy in a long model step still sees clients as alive."""
        self.static_replies: dict[str, dict[str, Any]] = {}
        """Replies that do not change while the daemon runs (``hello``, ``list_presets``), set by the compute side
        once the model is loaded: answered here at once, however busy the model is."""
        self.session_ids: set[str] = set()
        """Open sessions (kept by the compute loop): heartbeats are answered here, without waiting for a model step
        (Paranoid Pirate liveness is about the daemon process, which is alive while a slow chunk computes)."""

    # ------------------------------------------------------------------ lifetime

    def start_and_wait(self, timeout_s: float = 10.0) -> None:
        """Start the thread; return when its sockets are bound (READY), or raise why they could not be."""
        self.start()
        try:
            error = self._ready.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"the IO thread did not report READY within {timeout_s:g} s") from None
        if error is not None:
            raise error
        self.outbox.connect()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.outbox.stop()
        self.join(timeout_s)
        self.outbox.close()

    def run(self) -> None:
        try:
            wake = self.ctx.socket(zmq.PAIR)
            wake.setsockopt(zmq.LINGER, 0)
            wake.bind(self._wake_address)
            router = self.ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            router.setsockopt(zmq.MAXMSGSIZE, MAX_WIRE_BYTES)
            pub = self.ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 1000)  # let the last "stopping"/"dead" beat leave
            pub.setsockopt(zmq.SNDHWM, 1000)
            for sock, address, what in ((router, self.control_address, "control"), (pub, self.pub_address, "pub")):
                try:
                    sock.bind(address)
                except zmq.ZMQError as exc:
                    hint = "another sdlive daemon (or program) uses it: stop it or pick another port" if exc.errno == zmq.EADDRINUSE else "check the address"
                    for s in (wake, router, pub):
                        s.close(linger=0)
                    raise OSError(f"cannot bind the {what} socket to {address}: {exc.strerror} ({hint})") from None
            self.bound_control = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self.bound_pub = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            self._ready.put(exc)
            return
        self._ready.put(None)
        try:
            self._loop(wake, router, pub)
        except Exception as exc:  # noqa: BLE001 - a dead IO thread must stop the daemon, loudly
            log.exception("IO thread failed")
            self.inbox.put(IOFailed(f"IO thread failed: {type(exc).__name__}: {exc}"))
        finally:
            for net in self._net.values():
                net.pull.close(linger=0)
                net.push.close(linger=0)
            self._net.clear()
            router.close(linger=0)
            pub.close()  # LINGER above: flush what is queued
            wake.close(linger=0)

    def _loop(self, wake: zmq.Socket, router: zmq.Socket, pub: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        poller.register(router, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            stop = False
            if wake in events:
                while True:
                    try:
                        if wake.recv(zmq.NOBLOCK) == _STOP:
                            stop = True
                    except zmq.Again:
                        break
            # Outbound first: replies and frames the compute loop produced.
            self._drain_outbox(router, pub, poller)
            if router in events:
                for _ in range(256):  # bounded: a flood cannot starve the outbox
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self._on_control(router, frames)
            for sock, ev in events.items():
                session_id = self._pull_index.get(sock)
                if session_id is not None and ev & zmq.POLLIN:
                    self._on_net_input(session_id, sock)
            if stop:
                self._drain_outbox(router, pub, poller)
                return

    def net_dropped(self, session_id: str) -> int:
        """Outputs of a network session that could not be sent (no client connected, or it is not reading)."""
        net = self._net.get(session_id)
        return net.sent_dropped if net is not None else 0

    # ------------------------------------------------------------------ control in

    def _on_control(self, router: zmq.Socket, frames: list[bytes]) -> None:
        now = time.monotonic_ns()
        self.counters["requests"] += 1
        if len(frames) < 2:
            return  # nothing to answer to
        identity, rest = frames[0], frames[1:]
        if len(rest) == 1:
            envelope, payload = [identity], rest[0]
        elif len(rest) == 2 and rest[0] == b"":
            envelope, payload = [identity, b""], rest[1]  # REQ-style
        else:
            envelope = [identity, b""] if rest[0] == b"" else [identity]
            self._reject(
                router,
                envelope,
                ProtocolError(ErrorCode.BAD_REQUEST, f"send one JSON frame per request (got {len(rest)} frames)"),
            )
            return
        try:
            message = decode_request(payload)
            authorize(message, self.token)
        except ProtocolError as exc:
            self._reject(router, envelope, exc)
            return
        session_id = getattr(message, "session_id", None)
        if session_id is not None and session_id in self.session_ids:
            self.last_seen[session_id] = now  # any message counts as life
        static = self.static_replies.get(message.op)
        if static is not None:
            self._send(router, envelope, ok_reply(static, id=message.id))
            return
        if message.op == "heartbeat":
            if session_id is not None and session_id not in self.session_ids:
                self._send(
                    router,
                    envelope,
                    error_reply(ErrorCode.UNKNOWN_SESSION, f"no session {session_id!r}: it was closed or timed out", id=message.id),
                )
                return
            self._send(router, envelope, ok_reply({"session_id": session_id}, id=message.id))
            return
        self.inbox.put(Request(envelope, message, now))

    def _reject(self, router: zmq.Socket, envelope: list[bytes], exc: ProtocolError) -> None:
        self.counters["rejected"] += 1
        log.info("rejected a request: %s", exc)
        self._send(router, envelope, error_reply(exc.code, exc.message, id=exc.id))

    @staticmethod
    def _send(router: zmq.Socket, envelope: list[bytes], payload: bytes) -> None:
        try:
            router.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as exc:  # peer gone or its queue full: a reply is not worth blocking for
            log.debug("could not send a reply: %s", exc)

    # ------------------------------------------------------------------ outbox

    def _drain_outbox(self, router: zmq.Socket, pub: zmq.Socket, poller: zmq.Poller) -> None:
        while True:
            try:
                item = self.outbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._handle_out(item, router, pub, poller)
            except Exception:  # noqa: BLE001 - one bad item must not kill the IO thread
                log.exception("IO thread: failed to send %s", type(item).__name__)

    def _handle_out(self, item: Any, router: zmq.Socket, pub: zmq.Socket, poller: zmq.Poller) -> None:
        if isinstance(item, Reply):
            request_id = None
            if item.error is not None:
                payload = error_reply(item.error.code, item.error.message, id=item.error.id)
            else:
                body = dict(item.body or {})
                request_id = body.pop("id", None)
                payload = ok_reply(body, id=request_id)
            self._send(router, item.envelope, payload)
        elif isinstance(item, Publish):
            data = json.dumps(item.body, separators=(",", ":"), default=str).encode("utf-8")
            try:
                pub.send_multipart([item.topic.encode("ascii"), data], zmq.NOBLOCK)
            except zmq.Again:
                pass
        elif isinstance(item, NetOutput):
            net = self._net.get(item.session_id)
            if net is None:
                return
            from ..protocol import netframe

            try:
                netframe.send_frame(
                    net.push,
                    item.pixels,
                    seq=item.seq,
                    timestamp_ns=item.timestamp_ns,
                    pixel_format=item.pixel_format,
                    encoding=item.encoding,
                    jpeg_quality=item.quality,
                    flags=zmq.NOBLOCK,
                )
            except zmq.Again:
                net.sent_dropped += 1  # no client connected / it is not reading: live video drops
        elif isinstance(item, NetAttach):
            self._net[item.session_id] = _NetSession(item.pull, item.push, item.width, item.height, item.pixel_format)
            self._pull_index[item.pull] = item.session_id
            poller.register(item.pull, zmq.POLLIN)
        elif isinstance(item, NetDetach):
            net = self._net.pop(item.session_id, None)
            if net is not None:
                poller.unregister(net.pull)
                self._pull_index.pop(net.pull, None)
                net.pull.close(linger=0)
                net.push.close(linger=0)
        else:
            log.error("IO thread: unknown outbox item %r", item)

    # ------------------------------------------------------------------ network frames in

    def _on_net_input(self, session_id: str, sock: zmq.Socket) -> None:
        from ..protocol import netframe

        net = self._net[session_id]
        for _ in range(64):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.monotonic_ns()
            self.last_seen[session_id] = now
            try:
                if len(parts) != 2:
                    raise ValueError(f"a frame message has 2 parts [header, pixels], got {len(parts)}")
                header, pixels = netframe.decode_frame(parts[0].buffer, parts[1].buffer)
                if pixels.shape[:2] != (net.height, net.width) or header.pixel_format != net.pixel_format:
                    raise ValueError(
                        f"frame is {pixels.shape[1]}x{pixels.shape[0]} {header.pixel_format}, the session is "
                        f"{net.width}x{net.height} {net.pixel_format}"
                    )
            except Exception as exc:  # noqa: BLE001 - a bad frame is the client's fault, never ours to die of
                self.inbox.put(NetInputError(session_id, f"bad network frame: {exc}"))
                continue
            self.inbox.put(NetInput(session_id, int(header.seq), int(header.timestamp_ns), pixels, now))
