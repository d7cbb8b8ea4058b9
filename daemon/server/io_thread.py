"""The IO thread: the only owner of sockets; the compute loop sees two queues (vLLM's EngineCoreProc split).

Inbound, the thread decodes and authorises every control request itself, so a malformed, oversized, unknown or
unauthorised message is answered at once with an error reply, even while the compute loop is busy in the model,
and never reaches it. It then answers what it can on its own (``ops.FrontDesk``: hello, list_presets, heartbeat,
shutdown, and set_preset / set_params, acknowledged and queued) and hands the rest (open_session, close_session,
status) to the compute loop as :class:`~.items.LoopRequest` items, with network frames as
:class:`~.items.NetInput`. While the model loads, a ``loading.LoadingDesk`` answers instead (state "loading" and
progress, a ``loading`` error for what needs the model).

Outbound, the compute loop and the output thread put replies, PUB messages, network frames and network-session
binds/drops on the :class:`Outbox`, which wakes this thread through an inproc PAIR socket; the same PAIR carries
the stop message.

Startup is a READY handshake: :meth:`IOThread.start_and_wait` returns once every socket is bound, or raises the
bind error (address in use, bad interface) with the fix.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

import zmq

from ..protocol import netframe
from ..protocol.constants import host_of
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.messages import (
    TOPIC_DAEMON,
    DaemonBeat,
    NetEndpoints,
    Request,
    authorize,
    decode_request,
    encode_pub,
    error_reply,
    ok_reply,
)
from . import faults
from .auth import SocketAuth
from .directory import SessionDirectory
from .items import (
    LOOP_REQUEST_TYPES,
    InboundItem,
    IOFailed,
    LoopRequest,
    NetAttach,
    NetCounters,
    NetDetach,
    NetInput,
    NetInputError,
    NetOutput,
    OutboundItem,
    Publish,
    Reply,
)
from .loading import LoadingDesk
from .ops import FrontDesk
from .transports import NET_WAKE, NetLink

log = logging.getLogger(__name__)

_WAKE = b"w"
_STOP = b"s"
_DEAD_REPEATS = 6  # the dead sentinel, repeated for slow-joining subscribers
_DEAD_REPEAT_INTERVAL_S = 0.2
MAX_WIRE_BYTES = 32 * 2**20
"""ZeroMQ drops a peer that sends more than this in one message (memory guard); up to it, anything over the
protocol's 64 KiB limit gets a ``too_large`` reply."""
MAX_WAITING_REQUESTS = 256
"""Requests held while the model loads; beyond this a client is told to retry."""


@dataclass
class _NetSession:
    pull: zmq.Socket
    push: zmq.Socket
    width: int
    height: int
    pixel_format: str
    counters: NetCounters


# ---------------------------------------------------------------------------------------------------- outbox


class Outbox:
    """What the compute loop (or a signal handler) hands to the IO thread: a queue plus an inproc wake-up."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self._queue: queue.SimpleQueue[OutboundItem] = queue.SimpleQueue()
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

    def put(self, item: OutboundItem) -> None:
        self._queue.put(item)
        self._signal(_WAKE)

    def wake(self) -> None:
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

    def get_nowait(self) -> OutboundItem:
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
        inbox: queue.Queue[InboundItem],
        directory: SessionDirectory,
        secret: str | None = None,
    ) -> None:
        super().__init__(name="sdlive-io", daemon=True)
        self.ctx = ctx
        self.control_address = control
        self.pub_address = pub
        self.token = token
        self.secret = secret
        """Every socket secured with it when set (``auth.SocketAuth``): CurveZMQ with the token, else ZMTP PLAIN with
        the local secret (loopback only)."""
        self.auth: SocketAuth | None = None
        self.inbox = inbox
        self.directory = directory
        self._wake_address = f"inproc://sdlive-io-{id(self)}"
        self.outbox = Outbox(ctx, self._wake_address)
        self._ready: queue.Queue[BaseException | None] = queue.Queue()
        self._net: dict[str, _NetSession] = {}
        self._pull_index: dict[zmq.Socket, str] = {}
        self._net_host = _net_host(control)
        self.bound_control = control
        self.bound_pub = pub
        self.counters = {"requests": 0, "rejected": 0}
        self._desk: FrontDesk | LoadingDesk | None = None
        self._started_ns = time.monotonic_ns()
        self._waiting: list[tuple[list[bytes], Request, int]] = []

    def request_counters(self) -> dict[str, int]:
        """Control requests seen and rejected, and (with CurveZMQ) handshakes refused for a wrong key."""
        refused = self.auth.refused if self.auth is not None else 0
        return {**self.counters, "refused_handshakes": refused}

    def open_desk(self, desk: FrontDesk | LoadingDesk) -> None:
        """Answer requests through ``desk`` from now on (the loading desk while the model loads, then the front
        desk); requests that waited for a desk are answered now."""
        self._desk = desk
        self.outbox.wake()

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
            self.auth = SocketAuth(self.ctx, self.secret, "curve" if self.token else "plain")
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
            self.auth.secure(router)
            self.auth.secure(pub)
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
            if self.auth is not None:
                self.auth.stop()
            self._ready.put(exc)
            return
        self._ready.put(None)
        try:
            self._loop(wake, router, pub)
        except Exception as exc:  # noqa: BLE001 - a dead IO thread must stop the daemon, loudly
            reason = f"IO thread failed: {type(exc).__name__}: {exc}"
            log.exception("IO thread failed")
            self._publish_dead(pub, reason)
            self.inbox.put(IOFailed(reason))
        finally:
            for net in self._net.values():
                net.pull.close(linger=0)
                net.push.close(linger=0)
            self._net.clear()
            router.close(linger=0)
            pub.close()  # LINGER above: flush what is queued
            wake.close(linger=0)
            self.auth.stop()

    def _publish_dead(self, pub: zmq.Socket, reason: str) -> None:
        """The dead sentinel, sent by this thread itself: the compute loop's would go through the outbox, which no
        one drains once this thread is gone."""
        beat = DaemonBeat(
            state="dead",
            pid=os.getpid(),
            uptime_s=round((time.monotonic_ns() - self._started_ns) / 1e9, 2),
            sessions=len(self.directory.ids()),
            message=reason,
        )
        # Sent a few times over a second: a subscriber still joining (a client that started with the daemon, one
        # reconnecting) would miss a single beat, and this thread is going anyway.
        for attempt in range(_DEAD_REPEATS):
            try:
                pub.send_multipart(encode_pub(TOPIC_DAEMON, beat), zmq.NOBLOCK)
            except Exception:  # noqa: BLE001 - best effort: the process exits non-zero and logs the reason anyway
                log.exception("could not publish the dead sentinel")
                return
            if attempt + 1 < _DEAD_REPEATS:
                time.sleep(_DEAD_REPEAT_INTERVAL_S)

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
            if self._desk is not None and self._waiting:
                waiting, self._waiting = self._waiting, []
                for envelope, message, received_ns in waiting:
                    self._dispatch(router, envelope, message, received_ns)
            if router in events:
                faults.check("io")
                for _ in range(256):  # bounded: a flood cannot starve the outbox
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self._on_control_safely(router, frames)
            for sock, ev in events.items():
                session_id = self._pull_index.get(sock)
                if session_id is not None and ev & zmq.POLLIN:
                    self._on_net_input(session_id, sock)
            if stop:
                self._drain_outbox(router, pub, poller)
                return

    # ------------------------------------------------------------------ control in

    def _on_control_safely(self, router: zmq.Socket, frames: list[bytes]) -> None:
        """One request's unexpected failure is that request's: answered ``internal``, logged, never fatal."""
        try:
            self._on_control(router, frames)
        except Exception as exc:  # noqa: BLE001 - a bug reached by one message must not stop the daemon
            log.exception("control request failed")
            envelope = frames[:1] if len(frames) == 2 else frames[:2]
            self._send(router, envelope, error_reply(ErrorCode.INTERNAL, f"request failed: {type(exc).__name__}: {exc}"))

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
        if session_id is not None:
            self.directory.seen(session_id, now)  # any message counts as life
        if self._desk is None:
            if len(self._waiting) >= MAX_WAITING_REQUESTS:
                self._reject(router, envelope, ProtocolError(
                    ErrorCode.LOADING, "the daemon is starting: retry in a few seconds", id=message.id
                ))  # fmt: skip
                return
            self._waiting.append((envelope, message, now))
            return
        self._dispatch(router, envelope, message, now)

    def _dispatch(self, router: zmq.Socket, envelope: list[bytes], message: Request, received_ns: int) -> None:
        assert self._desk is not None
        try:
            reply = self._desk.answer(message)
            payload = ok_reply(reply, id=message.id) if reply is not None else None
        except ProtocolError as exc:
            self._send(router, envelope, error_reply(exc.code, exc.message, id=message.id))
            return
        except Exception as exc:  # noqa: BLE001 - answer, log, keep serving
            log.exception("op %s failed", message.op)
            self._send(router, envelope, error_reply(ErrorCode.INTERNAL, f"{message.op} failed: {exc}", id=message.id))
            return
        if payload is not None:
            self._send(router, envelope, payload)
        elif isinstance(message, LOOP_REQUEST_TYPES):
            self.inbox.put(LoopRequest(envelope, message, received_ns))
        else:
            self._send(router, envelope, error_reply(ErrorCode.UNKNOWN_OP, f"op {message.op!r} is not served", id=message.id))

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

    def _handle_out(self, item: OutboundItem, router: zmq.Socket, pub: zmq.Socket, poller: zmq.Poller) -> None:
        if isinstance(item, Reply):
            if item.error is not None:
                payload = error_reply(item.error.code, item.error.message, id=item.request_id)
            else:
                assert item.body is not None
                payload = ok_reply(item.body, id=item.request_id)
            self._send(router, item.envelope, payload)
        elif isinstance(item, Publish):
            try:
                pub.send_multipart(encode_pub(item.topic, item.message), zmq.NOBLOCK)
            except zmq.Again:
                pass
        elif isinstance(item, NetOutput):
            self._send_frame(item)
        elif isinstance(item, NetAttach):
            try:
                item.bound.set_result(self._attach(item, poller))
            except OSError as exc:
                item.bound.set_exception(exc)
        elif isinstance(item, NetDetach):
            net = self._net.pop(item.session_id, None)
            if net is not None:
                poller.unregister(net.pull)
                self._pull_index.pop(net.pull, None)
                net.pull.close(linger=0)
                net.push.close(linger=0)
        else:
            log.error("IO thread: unknown outbox item %r", item)

    def _send_frame(self, item: NetOutput) -> None:
        net = self._net.get(item.session_id)
        if net is None:
            return
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
            net.counters.sent_dropped += 1  # no client connected / it is not reading: live video drops

    def _attach(self, item: NetAttach, poller: zmq.Poller) -> NetEndpoints:
        """Bind a network session's PULL (frames in) and PUSH (frames out) on ephemeral ports of the control host."""
        pull = self.ctx.socket(zmq.PULL)
        push = self.ctx.socket(zmq.PUSH)
        for sock in (pull, push):
            sock.setsockopt(zmq.LINGER, 0)
            assert self.auth is not None
            self.auth.secure(sock)  # the frame sockets need the daemon's secret too (docs/security.md)
        pull.setsockopt(zmq.RCVHWM, item.queue_frames)
        pull.setsockopt(zmq.MAXMSGSIZE, item.width * item.height * 4 + 65536)
        push.setsockopt(zmq.SNDHWM, item.queue_frames)
        push.setsockopt(zmq.IMMEDIATE, 1)
        try:
            pull.bind(f"tcp://{self._net_host}:*")
            push.bind(f"tcp://{self._net_host}:*")
        except zmq.ZMQError as exc:
            pull.close(linger=0)
            push.close(linger=0)
            raise OSError(f"cannot bind network frame sockets on {self._net_host}: {exc}") from None
        self._net[item.session_id] = _NetSession(pull, push, item.width, item.height, item.pixel_format, item.counters)
        self._pull_index[pull] = item.session_id
        poller.register(pull, zmq.POLLIN)
        return NetEndpoints(
            input_address=pull.getsockopt_string(zmq.LAST_ENDPOINT),
            output_address=push.getsockopt_string(zmq.LAST_ENDPOINT),
        )

    # ------------------------------------------------------------------ network frames in

    def _on_net_input(self, session_id: str, sock: zmq.Socket) -> None:
        """Check each received frame against the session (``netframe.check_frame``: header fields and, for JPEG or
        PNG, the image size their own header declares) and queue it in the session's ``NetLink``, bounded, newest
        wins. Nothing is decoded here: this thread answers every client, and a frame declaring a huge image costs
        its header bytes only. The compute loop decodes (``NetTransport.take``) and is woken only when the link
        was empty, so frames never pile up on its inbox."""
        net = self._net[session_id]
        link = net.counters
        assert isinstance(link, NetLink), "network sessions are opened by transports.open_transport"
        for _ in range(64):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.monotonic_ns()
            self.directory.seen(session_id, now)
            try:
                if len(parts) != 2:
                    raise ValueError(f"a frame message has 2 parts [header, pixels], got {len(parts)}")
                header, payload = netframe.check_frame(
                    parts[0].buffer, parts[1].buffer, width=net.width, height=net.height, pixel_format=net.pixel_format
                )
            except Exception as exc:  # noqa: BLE001 - a bad frame is the client's fault, never ours to die of
                if link.refuse(now):  # counted; reported at most every 100 ms (a flood must not fill the inbox)
                    total = f" ({link.refused} refused so far)" if link.refused > 1 else ""
                    self.inbox.put(NetInputError(session_id, f"bad network frame: {exc}{total}"))
                continue
            if link.put(header, payload, now):
                self.inbox.put(NetInput(session_id, int(header.seq), int(header.timestamp_ns), NET_WAKE, now))


def _net_host(control: str) -> str:
    """Network sessions' frame sockets bind on the control socket's host (loopback stays loopback)."""
    if not control.startswith("tcp://"):
        return "127.0.0.1"
    host = host_of(control)
    return f"[{host}]" if ":" in host else host
