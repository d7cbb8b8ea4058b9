"""Client library for the sdlive daemon: control over ZeroMQ, frames over shared memory or the network.

::

    from sdlive.obs_bridge.client import DaemonClient

    with DaemonClient() as daemon:                       # tcp://127.0.0.1:5557
        print(daemon.hello().model)                      # HelloReply
        with daemon.open_session(width=512, height=512, fps=30, preset="anime") as session:
            session.send(frame)                          # H×W×3 uint8, BGR by default
            out = session.recv(timeout_s=1.0)            # RestyledFrame(seq, timestamp_ns, pixels) or None
            session.set_preset("watercolor")             # SetPresetReply (pending: live once status shows it)

The wire contract (``sdlive.daemon.protocol``) is the one definition of every message: requests are built with its
request models (a bad value fails here, before sending, with the daemon's own bounds: :class:`InvalidRequest`) and
every reply is parsed into its op's reply model (``decode_reply``); an error reply raises :class:`DaemonError`.
Its constants (addresses, heartbeat timing, pixel formats) come from ``sdlive.daemon.protocol.constants``.

Control is a DEALER socket sending one JSON frame per request (``docs/protocol.md``). When the daemon does not
answer in ``timeout_s`` the socket is thrown away (LINGER 0) and a fresh one is made for the next request (the
ZeroMQ Guide's Lazy/Paranoid Pirate), and :class:`DaemonUnavailable` says so and how to fix it.

A session sends heartbeats from a background thread on its own socket (the interval and liveness the daemon gives
in ``open_session``, capped doubling reconnect backoff); the daemon closes a session whose client goes silent, and
unlinks its shared memory.

No torch here: this module runs on an OBS box without the GPU extra.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, get_args

import numpy as np
import zmq
from pydantic import BaseModel, ValidationError

from sdlive.daemon.protocol import netframe
from sdlive.daemon.protocol.constants import (
    DEFAULT_CONTROL_ADDRESS,
    PIXEL_FORMATS,
    PROTOCOL_VERSION,
    RECONNECT_INTERVAL_INIT_S,
    RECONNECT_INTERVAL_MAX_S,
    host_of,
    is_loopback_address,
)
from sdlive.daemon.protocol.errors import ErrorCode, ProtocolError
from sdlive.daemon.protocol.messages import (
    TOPIC_DAEMON,
    TOPIC_EVENT,
    TOPIC_STATS,
    CloseSessionReply,
    CloseSessionRequest,
    DaemonBeat,
    ErrorReply,
    Event,
    HeartbeatReply,
    HeartbeatRequest,
    HelloReply,
    HelloRequest,
    ListPresetsReply,
    ListPresetsRequest,
    OpenSessionReply,
    OpenSessionRequest,
    Request,
    SessionStats,
    SetParamsReply,
    SetParamsRequest,
    SetPresetReply,
    SetPresetRequest,
    ShutdownReply,
    ShutdownRequest,
    StatusReply,
    StatusRequest,
    Transport,
    decode_pub,
    decode_reply,
    describe_validation_error,
    encode_request,
)
from sdlive.daemon.protocol.params import GenerationParams
from sdlive.daemon.protocol.ring import FrameRing, RingError
from sdlive.daemon.protocol.secret import (
    LocalSecretError,
    Mechanism,
    client_security,
    describe_handshake_failure,
    secure_client_socket,
)

from .frames import check_frame

log = logging.getLogger(__name__)

__all__ = [
    "DaemonClient",
    "DaemonError",
    "DaemonUnavailable",
    "InvalidAddress",
    "InvalidRequest",
    "RestyledFrame",
    "SessionClient",
    "SessionLost",
    "check_address",
]

CLOSE_TIMEOUT_S = 2.0
"""``SessionClient.close`` waits at most this for the daemon's answer."""

TRANSPORTS = ("auto", *get_args(Transport))
"""``open_session(transport=...)``: the protocol's transports, or ``auto`` (shm on this machine, else net)."""

_ModelT = TypeVar("_ModelT", bound=BaseModel)

_Socket = zmq.Socket[bytes]
_Context = zmq.Context[_Socket]


class DaemonError(Exception):
    """The daemon answered with an error (``code`` is one of the protocol's stable codes, ``ErrorCode``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DaemonUnavailable(DaemonError, ConnectionError):
    """No daemon answered at the address."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


class InvalidAddress(DaemonError, ValueError):
    """A daemon address that is not a ZeroMQ endpoint this client can connect to; the message shows a right one."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_address", message)


class SessionLost(DaemonError):
    """The session is gone: the daemon closed it, stopped, died (its dead sentinel on PUB) or restarted without it.
    ``code`` is ``unknown_session``; open a new session (once a daemon answers again) to go on."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNKNOWN_SESSION.value, message)


class InvalidRequest(DaemonError, ValueError):
    """Refused before sending: a field the request model rejects, with the code the daemon would answer
    (``bad_params`` for a generation parameter out of range, ``bad_request`` for anything else)."""


@dataclass(frozen=True)
class RestyledFrame:
    """A restyled frame from the daemon.

    ``seq`` is the session's output sequence number: 1 for the first output, then +1 per output (a gap means the
    daemon dropped outputs); ``timestamp_ns`` is the capture timestamp of the input frame it restyles, as given to
    :meth:`SessionClient.send`. (Capture sources count their frames from 0 instead: ``CapturedFrame.index``.)"""

    seq: int
    timestamp_ns: int
    pixels: np.ndarray


def build_request(model: type[_ModelT], **fields: Any) -> _ModelT:
    """A request model from keyword fields; a field the model rejects raises :class:`InvalidRequest` with the code
    and bounds the daemon applies (the same model validates the request there)."""
    try:
        return model(**fields)
    except ValidationError as exc:
        code, message = describe_validation_error(exc, model.model_fields["op"].default)
        raise InvalidRequest(code.value, message) from None


def check_address(address: object) -> str:
    """``address`` if it is a ZeroMQ endpoint a client can connect to (``tcp://HOST:PORT``, ``ipc://PATH``,
    ``inproc://NAME``); else :class:`InvalidAddress` saying what is wrong and showing a right one."""
    example = f"e.g. {DEFAULT_CONTROL_ADDRESS}"
    if not isinstance(address, str) or not address.strip():
        raise InvalidAddress(f"daemon address {address!r} is not a ZeroMQ endpoint: use tcp://HOST:PORT, {example}")
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc"):
        hint = f"did you mean tcp://{address}?" if not sep and ":" in address else example
        raise InvalidAddress(f"daemon address {address!r} is not a ZeroMQ endpoint: write tcp://HOST:PORT ({hint})")
    if not rest:
        raise InvalidAddress(f"daemon address {address!r} names nothing after {scheme}://, {example}")
    if scheme != "tcp":
        return address
    host = host_of(address)
    port = rest.rsplit("]:", 1)[1] if rest.startswith("[") and "]:" in rest else rest.rpartition(":")[2]
    if not host or ":" not in rest or (rest.startswith("[") and "]:" not in rest):
        raise InvalidAddress(f"daemon address {address!r} has no port: write tcp://HOST:PORT, {example}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidAddress(f"daemon address {address!r}: port {port!r} is not a number from 1 to 65535, {example}")
    return address


def _same_host(control: str, endpoint: str) -> str:
    """``endpoint``'s port on the host of ``control`` (both tcp://HOST:PORT): the daemon may bind a wildcard."""
    if not (control.startswith("tcp://") and endpoint.startswith("tcp://")):
        return endpoint
    host = host_of(control)
    port = endpoint.rsplit(":", 1)[1]
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _unavailable(address: str, timeout_s: float) -> DaemonUnavailable:
    return DaemonUnavailable(
        f"no sdlive daemon answered at {address} within {timeout_s:g} s: start one with `sdlive serve` "
        f"(or point the client at the right address / check the firewall for a remote daemon)"
    )


Security = tuple[Mechanism, str | None]
"""How a client's sockets are secured: ``("curve", token)``, ``("plain", local secret)`` or ``("none", None)``."""


def _secure(sock: _Socket, security: Security) -> _Socket:
    """Make ``sock`` (before ``connect``) a CurveZMQ (token) or PLAIN (local secret) client; NULL for none."""
    mechanism, secret = security
    if secret is not None:
        secure_client_socket(sock, secret, mechanism)
    return sock


def _dealer(ctx: _Context, address: str, *, immediate: bool, security: Security = ("none", None)) -> _Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    _secure(sock, security)
    sock.connect(address)
    return sock


def _client_secret(token: str | None, address: str) -> tuple[str | None, str]:
    """The secret this client's sockets use and where it came from (``protocol.secret.client_security``): the
    token (``"token"``, CurveZMQ), else on loopback this user's local secret file when a daemon with local auth
    created one (``"local"``, PLAIN), else none (``"none"``)."""
    try:
        mechanism, secret = client_security(token, is_loopback_address(address))
    except LocalSecretError as exc:
        raise DaemonError(ErrorCode.UNAUTHORIZED.value, str(exc)) from None
    return secret, {"curve": "token", "plain": "local", "none": "none"}[mechanism]


_MECHANISM: dict[str, Mechanism] = {"token": "curve", "local": "plain", "none": "none"}


_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class _Channel:
    """One DEALER socket doing request/reply with timeouts; replaced by a fresh socket after a timeout.

    Its security follows the daemon's (docs/security.md): CurveZMQ with keys from the token, or on loopback PLAIN
    with this user's local secret. A monitor on the socket turns a failed handshake into a clear error instead of a
    timeout; a local secret the daemon does not use (it runs without local auth) is dropped and the request
    retried plain."""

    def __init__(self, ctx: _Context, address: str, *, token: str | None, timeout_s: float) -> None:
        self.ctx = ctx
        self.address = address
        self.token = token
        self.timeout_s = timeout_s
        self.secret, self.secret_from = _client_secret(token, address)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._socket: _Socket | None = None
        self._monitor: _Socket | None = None
        self._retries = 0

    def _connect(self) -> tuple[_Socket, _Socket | None]:
        if self._socket is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            _secure(sock, self.security)
            # watched only when there is a secret to get wrong, or a daemon may want one we do not have
            self._monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
            sock.connect(self.address)
            self._socket = sock
        return self._socket, self._monitor

    @property
    def security(self) -> Security:
        """The mechanism and secret this channel's sockets use."""
        return _MECHANISM[self.secret_from], self.secret

    def reset(self) -> None:
        if self._socket is not None:
            if self._monitor is not None:
                self._socket.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self._socket.close(linger=0)
            self._socket = None

    def _handshake_failed(self, monitor: _Socket) -> bool:
        """A handshake failure the monitor reported: True to retry on a fresh socket with another secret (the local
        secret appeared, changed, or the daemon does not use local auth); otherwise raises DaemonError naming the
        fix."""
        from zmq.utils.monitor import recv_monitor_message

        event = int(recv_monitor_message(monitor)["event"])
        why = describe_handshake_failure(event)
        if why is None:
            return False
        self.reset()
        if self.secret_from != "token" and self._retries > 0:
            self._retries -= 1
            fresh, origin = _client_secret(None, self.address)  # the file now (a daemon may just have made it)
            if self.secret_from == "local" and fresh == self.secret:
                fresh, origin = None, "none"  # the daemon runs without local auth: talk to it plainly
            if fresh != self.secret:
                log.debug("daemon at %s: handshake failed (%s); retrying with secret from %s", self.address, why, origin)
                self.secret, self.secret_from = fresh, origin
                return True
        raise DaemonError(ErrorCode.UNAUTHORIZED.value, f"cannot talk to the daemon at {self.address}: {why}")

    def call(self, request: Request, reply_type: type[_ModelT], *, timeout_s: float | None = None) -> _ModelT:
        """Send ``request`` (its id and token set here) and return the reply parsed as ``reply_type``."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            request_id = next(self._ids)
            payload = encode_request(request.model_copy(update={"id": request_id, "token": self.token}))
            deadline = time.monotonic() + timeout_s
            self._retries = 2
            while True:
                reply = self._exchange(payload, request_id, request.op, deadline, timeout_s)
                if reply is not None:
                    break
            if isinstance(reply, ErrorReply):
                raise DaemonError(reply.error.code, reply.error.message)
            if not isinstance(reply, reply_type):  # decode_reply parses by op: a mismatch is a bug here
                raise TypeError(f"{request.op} reply parsed as {type(reply).__name__}, not {reply_type.__name__}")
            return reply

    def _exchange(self, payload: bytes, request_id: int, op: str, deadline: float,
                  timeout_s: float) -> BaseModel | None:
        """One send and its reply; None to start again on a fresh socket (a handshake to redo without a secret)."""
        sock, monitor = self._connect()
        poller = zmq.Poller()
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        sent = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.reset()
                raise _unavailable(self.address, timeout_s)
            if not sent:
                try:
                    sock.send(payload, zmq.NOBLOCK)
                    sent = True
                    poller.register(sock, zmq.POLLIN)
                    continue
                except zmq.Again:  # IMMEDIATE: no connected peer yet; wait for one until the deadline
                    poller.register(sock, zmq.POLLOUT)
            ready = dict(poller.poll(min(int(remaining * 1000) + 1, 50 if not sent else 1 << 30)))
            if monitor is not None and monitor in ready:
                if self._handshake_failed(monitor):
                    return None
                continue
            if not sent or sock not in ready:
                continue
            raw = sock.recv_multipart()[-1]
            try:
                reply = decode_reply(raw, op)
            except ProtocolError as exc:
                self.reset()
                raise DaemonError(exc.code.value, f"unreadable reply from {self.address}: {exc.message}") from None
            if isinstance(reply, dict):  # decode_reply gives a model when told the op
                raise TypeError(f"{op} reply was not parsed into its model")
            if reply.id not in (request_id, None):
                continue  # not the reply to this request (a DEALER may see replies to pipelined requests)
            return reply

    def close(self) -> None:
        with self._lock:
            self.reset()


class DaemonClient:
    """Control connection to an sdlive daemon (thread-safe: requests are serialised).

    Every method returns its op's reply model (``sdlive.daemon.protocol.messages``) or raises :class:`DaemonError`
    (:class:`DaemonUnavailable` when no daemon answers, :class:`InvalidRequest` before sending a bad value)."""

    def __init__(
        self, address: str = DEFAULT_CONTROL_ADDRESS, *, token: str | None = None, timeout_s: float = 5.0
    ) -> None:
        check_address(address)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.address = address
        self.token = token if token is not None else os.environ.get("SDLIVE_TOKEN") or None
        self.timeout_s = timeout_s
        self._ctx: _Context = zmq.Context.instance()
        self._channel = _Channel(self._ctx, address, token=self.token, timeout_s=timeout_s)
        self._closed = False
        self.last_hello: HelloReply | None = None
        """The last ``hello`` reply (sessions learn the daemon's PUB address and pid from it)."""

    # ------------------------------------------------------------------ requests

    def _call(self, request: Request, reply_type: type[_ModelT], *, timeout_s: float | None = None) -> _ModelT:
        if self._closed:
            raise DaemonError("closed", "this DaemonClient is closed")
        return self._channel.call(request, reply_type, timeout_s=timeout_s)

    def hello(self, *, client: str | None = None) -> HelloReply:
        """The daemon's identity, capabilities and whether it wants a token; refuses another protocol version."""
        reply = self._call(build_request(HelloRequest, client=client, protocol=PROTOCOL_VERSION), HelloReply)
        if reply.protocol != PROTOCOL_VERSION:
            raise DaemonError(
                "bad_request",
                f"daemon speaks {reply.protocol!r}, this client {PROTOCOL_VERSION!r}: upgrade sdlive on both sides",
            )
        self.last_hello = reply
        return reply

    def wait_ready(self, timeout_s: float, *, on_loading: Callable[[HelloReply], None] | None = None,
                   poll_s: float = 0.25) -> HelloReply:
        """``hello`` until the daemon says ``state: "ready"`` (a daemon loading a large model answers ``loading``
        with its progress for minutes); ``on_loading`` sees each loading reply. :class:`DaemonUnavailable` when it
        is not ready within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.hello()
            if getattr(reply, "state", "ready") == "ready":
                return reply
            if on_loading is not None:
                on_loading(reply)
            if time.monotonic() + poll_s > deadline:
                loading = getattr(reply, "loading", None)
                stage = f" ({loading.stage})" if loading is not None else ""
                raise DaemonUnavailable(f"the daemon at {self.address} is still loading {reply.model}{stage} after "
                                        f"{timeout_s:g} s: wait for it (`sdlive status --wait`)")
            time.sleep(poll_s)

    def list_presets(self) -> ListPresetsReply:
        """The presets (``.presets``, sorted by name) and the preset files the daemon skipped (``.problems``)."""
        return self._call(build_request(ListPresetsRequest), ListPresetsReply)

    def status(self, session_id: str | None = None) -> StatusReply:
        """The daemon's figures and every session's (or only ``session_id``'s) ``SessionStats``."""
        return self._call(build_request(StatusRequest, session_id=session_id), StatusReply)

    def set_preset(self, session_id: str, name: str) -> SetPresetReply:
        """Queue a preset switch; answered on receipt (``pending``): it is live once ``status`` shows it."""
        return self._call(build_request(SetPresetRequest, session_id=session_id, name=name), SetPresetReply)

    def set_params(self, session_id: str, **changes: Any) -> SetParamsReply:
        """Queue a change of style fields (``StyleUpdate``'s: prompt, steps, noise_scale, seed, transition_chunks);
        answered on receipt (``pending``): it is live once ``status`` shows it."""
        return self._call(build_request(SetParamsRequest, session_id=session_id, **changes), SetParamsReply)

    def close_session(self, session_id: str, *, timeout_s: float | None = None) -> CloseSessionReply:
        return self._call(
            build_request(CloseSessionRequest, session_id=session_id), CloseSessionReply, timeout_s=timeout_s
        )

    def heartbeat(self, session_id: str | None = None) -> HeartbeatReply:
        return self._call(build_request(HeartbeatRequest, session_id=session_id), HeartbeatReply)

    def shutdown(self) -> ShutdownReply:
        return self._call(build_request(ShutdownRequest), ShutdownReply)

    def open_session(
        self,
        *,
        width: int,
        height: int,
        fps: float,
        pixel_format: str = "bgr24",
        preset: str | None = None,
        params: Mapping[str, Any] | None = None,
        transport: str = "auto",
        client: str | None = None,
        jpeg_quality: int | None = None,
        pacing: str = "live",
    ) -> SessionClient:
        """Open a session and attach to its frame transport.

        ``params`` are generation parameters over the preset's (``ParamsUpdate``: the style fields and
        ``stream_batch``). ``transport="auto"`` uses shared memory when the daemon address is loopback, the network
        otherwise (and falls back to the network when the shared memory cannot be opened, e.g. from another
        container). ``jpeg_quality`` (network only) sends JPEG at that quality instead of raw pixels, both ways.
        ``pacing``: ``"live"`` (outputs leave at the source rate, newest input wins) or ``"offline"`` (every input
        in order, each output as soon as it is ready: a renderer that paces itself, as fast as the model goes).
        """
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}: use one of {', '.join(TRANSPORTS)}")
        if jpeg_quality is not None and not 1 <= int(jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
        try:  # numpy integers are fine, floats are not (frames have whole pixel sizes)
            width, height = operator.index(width), operator.index(height)
        except TypeError:
            raise TypeError(f"width and height must be integers, got {width!r} x {height!r}") from None

        def request(chosen: str) -> OpenSessionRequest:
            return build_request(
                OpenSessionRequest,
                width=width,
                height=height,
                fps=float(fps),
                pixel_format=pixel_format,
                preset=preset,
                params=dict(params) if params is not None else None,
                transport=chosen,
                encoding="jpeg" if jpeg_quality and chosen == "net" else "raw",
                pacing=pacing,
                client=client or f"python-{os.getpid()}",
            )

        chosen = transport
        if transport == "auto":
            chosen = "shm" if is_loopback_address(self.address) and jpeg_quality is None else "net"
        checked = request(chosen)  # refused here, before anything is sent
        if self.last_hello is None:  # a session watches the daemon's PUB beats: learn where they are
            self.hello()
        reply = self._call(checked, OpenSessionReply)
        try:
            return SessionClient(self, reply, jpeg_quality=jpeg_quality)
        except _ShmUnavailable as exc:
            try:
                self.close_session(reply.session_id)
            except DaemonError:
                pass
            if transport != "auto":
                raise DaemonError("internal", str(exc)) from exc
            log.info("shared memory not reachable (%s); using the network transport", exc)
            return SessionClient(self, self._call(request("net"), OpenSessionReply), jpeg_quality=jpeg_quality)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._channel.close()

    @property
    def secret(self) -> str | None:
        """The secret this client's sockets use (its token for CurveZMQ, or this user's local secret for PLAIN), or
        None."""
        return self._channel.secret

    @property
    def security(self) -> Security:
        """How this client's sockets are secured: ``("curve", token)``, ``("plain", local secret)``, ``("none",
        None)``."""
        return self._channel.security

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DaemonClient({self.address!r})"


class _ShmUnavailable(Exception):
    pass


class _Heartbeat(threading.Thread):
    """Paranoid Pirate heartbeats for one session, on a DEALER socket of its own, and a watch on the daemon's PUB.

    One heartbeat per interval; any reply counts as life. After ``liveness`` silent intervals the daemon is presumed
    gone (``daemon_alive`` False: the session's ``send``/``recv`` raise :class:`DaemonUnavailable` until it answers
    again): the socket is replaced (LINGER 0) and retried with a doubling backoff from ``RECONNECT_INTERVAL_INIT_S``
    capped at ``RECONNECT_INTERVAL_MAX_S``. The socket is kept across slow replies (a busy machine), never reset
    per request.

    The PUB watch (a SUB on ``pub_address``, when the daemon said where it is) follows what the daemon says about
    this session: ``stats`` (``SessionClient.daemon_stats``), ``preset_changed``/``params_changed`` events from any
    client, ``session_closed``/``client_lost``, and the ``daemon`` beat's ``stopping``/``dead`` sentinel, which
    ends the session at once (:class:`SessionLost`) instead of after the liveness window.
    """

    def __init__(self, session: SessionClient, address: str, token: str | None, interval_s: float, liveness: int,
                 pub_address: str | None = None, daemon_pid: int | None = None, security: Security = ("none", None)) -> None:
        super().__init__(name=f"sdlive-heartbeat-{session.session_id}", daemon=True)
        self._session = session
        self._address = address
        self._interval_s = interval_s
        self._liveness = liveness
        self._pub_address = pub_address
        self._daemon_pid = daemon_pid
        self._security = security
        self._payload = encode_request(build_request(HeartbeatRequest, session_id=session.session_id, token=token))
        self._halt = threading.Event()
        self.daemon_alive = True
        self.last_heard = time.monotonic()

    def _socket(self) -> _Socket:
        return _dealer(zmq.Context.instance(), self._address, immediate=False, security=self._security)

    def _subscriber(self) -> _Socket | None:
        if not self._pub_address:
            return None
        sub: _Socket = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 64)
        for topic in (TOPIC_DAEMON, TOPIC_EVENT, TOPIC_STATS):
            sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        _secure(sub, self._security)
        try:
            sub.connect(_same_host(self._address, self._pub_address))
        except zmq.ZMQError as exc:
            log.debug("cannot watch the daemon's PUB at %s: %s", self._pub_address, exc)
            sub.close(linger=0)
            return None
        return sub

    def _on_pub(self, frames: list[bytes]) -> bool:
        """Handle one PUB message; False when it ends the session."""
        session = self._session
        try:
            topic, message = decode_pub(frames)
        except (ProtocolError, ValueError, IndexError):
            return True
        if isinstance(message, DaemonBeat):
            if self._daemon_pid is not None and message.pid != self._daemon_pid:
                return True  # another daemon process on the same PUB address (a restart): the heartbeat decides
            if message.state in ("stopping", "dead"):
                why = "stopped" if message.state == "stopping" else "died"
                reason = f": {message.message}" if message.message else ""
                session._mark_lost(f"the daemon at {self._address} {why}{reason} (session {session.session_id} "
                                   f"is gone; open a new one once a daemon answers again)")
                return False
        elif isinstance(message, Event) and message.session_id == session.session_id:
            if message.event == "preset_changed" and message.preset:
                session.preset = message.preset
            elif message.event == "params_changed":
                session.preset = message.preset or session.preset
                session.params = message.params or session.params
            elif message.event in ("session_closed", "client_lost"):
                why = message.message or message.event.replace("_", " ")
                session._mark_lost(f"session {session.session_id} was closed by the daemon at {self._address}: {why}")
                return False
        elif isinstance(message, SessionStats) and message.session_id == session.session_id:
            session.daemon_stats = message
        return True

    def _listen(self, sock: _Socket, sub: _Socket | None) -> bool | None:
        """Wait one interval for replies: True if any came, False if none, None when the session is gone."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if sub is not None:
            poller.register(sub, zmq.POLLIN)
        deadline = time.monotonic() + self._interval_s
        heard = False
        while (remaining := deadline - time.monotonic()) > 0 and not self._halt.is_set():
            ready = dict(poller.poll(int(remaining * 1000) + 1))
            if sub is not None and sub in ready:
                while True:
                    try:
                        frames = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if not self._on_pub(frames):
                        return None
            if sock not in ready:
                continue
            try:
                reply = decode_reply(sock.recv_multipart()[-1], "heartbeat")
            except ProtocolError:
                continue
            heard = True
            self.last_heard = time.monotonic()
            if isinstance(reply, ErrorReply) and reply.error.code == ErrorCode.UNKNOWN_SESSION.value:
                self._session._mark_lost(
                    f"session {self._session.session_id} was closed by the daemon: {reply.error.message}"
                )
                return None
        return heard

    def run(self) -> None:
        sock = self._socket()
        sub = self._subscriber()
        liveness = self._liveness
        backoff = RECONNECT_INTERVAL_INIT_S
        try:
            while not self._halt.is_set():
                try:
                    sock.send(self._payload, zmq.NOBLOCK)
                except zmq.Again:
                    pass  # not connected yet: this interval counts as silent
                heard = self._listen(sock, sub)
                if heard is None:
                    return
                if heard:
                    liveness = self._liveness
                    backoff = RECONNECT_INTERVAL_INIT_S
                    self.daemon_alive = True
                    continue
                liveness -= 1
                if liveness > 0:
                    continue
                if self.daemon_alive:
                    log.warning("daemon at %s silent for %d heartbeats; reconnecting", self._address, self._liveness)
                self.daemon_alive = False
                sock.close(linger=0)
                if self._halt.wait(backoff):
                    return
                backoff = min(backoff * 2, RECONNECT_INTERVAL_MAX_S)
                sock = self._socket()
                liveness = 1  # silent already: one more silent interval per reconnect attempt
        finally:
            sock.close(linger=0)
            if sub is not None:
                sub.close(linger=0)

    def stop(self) -> None:
        self._halt.set()


class SessionClient:
    """One open session: ``send`` input frames, ``recv`` restyled frames, change the style live.

    ``info`` is the daemon's ``OpenSessionReply`` (geometry, rings or network endpoints, latency, parameters)."""

    def __init__(self, daemon: DaemonClient, info: OpenSessionReply, *, jpeg_quality: int | None = None) -> None:
        self._daemon = daemon
        self.info = info
        self.session_id: str = info.session_id
        self.width: int = info.width
        self.height: int = info.height
        self.fps: float = info.fps
        self.pixel_format: str = info.pixel_format
        if info.pixel_format not in PIXEL_FORMATS:
            raise DaemonError("internal", f"the daemon opened session {info.session_id} in an unknown pixel format "
                                          f"{info.pixel_format!r}")
        self.channels = PIXEL_FORMATS[info.pixel_format].bytes_per_pixel
        self.latency_frames: int = info.latency_frames
        self.transport: str = info.transport
        self.preset: str | None = info.preset
        """The session's preset: as opened, then as switched by this client or (seen on PUB) by any other."""
        self.params: GenerationParams | None = info.params
        self.daemon_stats: SessionStats | None = None
        """The daemon's latest figures for this session (PUB ``stats``, once a second): its drop counts etc."""
        self.jpeg_quality = jpeg_quality
        self.encoding: str = info.net.encoding if info.net is not None else "raw"
        self._shape = (self.height, self.width, self.channels)
        self._frames_sent = 0
        self._frames_received = 0
        self._closed = False
        self._lost: str | None = None
        self._in_ring: FrameRing | None = None
        self._out_ring: FrameRing | None = None
        self._data: _Socket | None = None
        self._data_out: _Socket | None = None
        self._send_dropped = 0
        self._net_seq = 0
        self._sent_times: list[float] = []
        if self.transport == "shm":
            self._open_rings(info)
        else:
            self._open_data(info)
        hello = daemon.last_hello
        self._heartbeat = _Heartbeat(self, daemon.address, daemon.token, info.heartbeat_interval_s,
                                     info.heartbeat_liveness, pub_address=hello.pub_address if hello else None,
                                     daemon_pid=hello.pid if hello else None, security=daemon.security)
        self._heartbeat.start()

    def _open_rings(self, info: OpenSessionReply) -> None:
        if not info.input_ring or not info.output_ring:
            raise DaemonError("internal", f"the daemon gave no rings for shared-memory session {info.session_id}")
        try:
            self._in_ring = FrameRing.open(info.input_ring)
            self._out_ring = FrameRing.open(info.output_ring)
        except (RingError, OSError) as exc:
            if self._in_ring is not None:
                self._in_ring.close()
            raise _ShmUnavailable(f"cannot open the session's shared memory: {exc}") from exc

    def _open_data(self, info: OpenSessionReply) -> None:
        if info.net is None:
            raise DaemonError("internal", "the daemon gave no frame endpoints for a network session")
        ctx: _Context = zmq.Context.instance()
        # The daemon may bind a wildcard (tcp://0.0.0.0:…): reach each port by the host control was reached on.
        self.input_address = _same_host(self._daemon.address, info.net.input_address)
        self.output_address = _same_host(self._daemon.address, info.net.output_address)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, 4)
        _secure(push, self._daemon.security).connect(self.input_address)
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 16)
        _secure(pull, self._daemon.security).connect(self.output_address)
        self._data, self._data_out = push, pull

    # ------------------------------------------------------------------ frames

    def _check_live(self) -> None:
        """Raise instead of sending into the void: :class:`SessionLost` once the session is gone for good,
        :class:`DaemonUnavailable` while the daemon is silent (its heartbeats stopped; it may come back)."""
        if self._closed:
            raise DaemonError("closed", f"session {self.session_id} is closed")
        if self._lost is not None:
            raise SessionLost(self._lost)
        if self._in_ring is not None and self._in_ring.closed_flag:
            self._mark_lost(f"session {self.session_id} was closed by the daemon")
            raise SessionLost(self._lost or "")
        if not self._heartbeat.daemon_alive:
            silent = time.monotonic() - self._heartbeat.last_heard
            raise DaemonUnavailable(f"the daemon at {self._daemon.address} has not answered for {silent:.0f} s "
                                    f"(stopped, stalled or unreachable); session {self.session_id} waits for it")

    def send(self, frame: np.ndarray, timestamp_ns: int | None = None) -> int:
        """Hand one input frame to the daemon (never blocks); returns its sequence number (1, 2, …)."""
        self._check_live()
        frame = check_frame(frame, self._shape, context=f"the session is {self.width}x{self.height} {self.pixel_format}")
        if timestamp_ns is None:
            timestamp_ns = time.monotonic_ns()
        if self._in_ring is not None:
            seq = self._in_ring.write(frame, timestamp_ns=timestamp_ns)
        else:
            self._net_seq += 1
            seq = self._net_seq
            assert self._data is not None
            try:
                netframe.send_frame(
                    self._data,
                    frame,
                    seq=seq,
                    timestamp_ns=timestamp_ns,
                    pixel_format=self.pixel_format,
                    encoding=self.encoding,
                    jpeg_quality=self.jpeg_quality or netframe.DEFAULT_JPEG_QUALITY,
                    flags=zmq.NOBLOCK,
                )
            except zmq.Again:
                self._send_dropped += 1  # live video: the daemon is not keeping up, this frame is dropped
        self._frames_sent += 1
        self._sent_times.append(time.monotonic())
        if len(self._sent_times) > 64:
            del self._sent_times[:-64]
        return seq

    def recv(self, timeout_s: float = 1.0) -> RestyledFrame | None:
        """The next restyled frame in order, or None if none arrives within ``timeout_s``."""
        self._check_live()
        deadline = time.monotonic() + max(0.0, timeout_s)
        if self._out_ring is not None:
            ring = self._out_ring
            while True:
                pixels = np.empty(self._shape, np.uint8)
                got = ring.read_next(out=pixels.reshape(-1))
                if got is not None:
                    self._frames_received += 1
                    return RestyledFrame(got.seq, got.timestamp_ns, pixels)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                ring.wait(min(remaining, 0.05), poll_s=0.001)
                self._check_live()
        assert self._data_out is not None
        while True:
            remaining = deadline - time.monotonic()
            if not self._data_out.poll(max(0, int(remaining * 1000)), zmq.POLLIN):
                return None
            try:
                header, pixels = netframe.recv_frame(self._data_out, zmq.NOBLOCK)
            except zmq.Again:
                continue
            except (ValueError, netframe.NetFrameError) as exc:
                log.warning("session %s: dropping a bad frame from the daemon: %s", self.session_id, exc)
                continue
            if pixels.shape != self._shape:
                log.warning("session %s: dropping a %s frame (expected %s)", self.session_id, pixels.shape, self._shape)
                continue
            self._frames_received += 1
            return RestyledFrame(int(header.seq), int(header.timestamp_ns), np.array(pixels))

    # ------------------------------------------------------------------ control

    def set_preset(self, name: str) -> SetPresetReply:
        """Queue a preset switch (see :meth:`DaemonClient.set_preset`); ``preset`` names it at once."""
        self._check_live()
        reply = self._daemon.set_preset(self.session_id, name)
        self.preset = reply.preset
        return reply

    def set_params(self, **changes: Any) -> SetParamsReply:
        """Queue a change of style fields (see :meth:`DaemonClient.set_params`)."""
        self._check_live()
        reply = self._daemon.set_params(self.session_id, **changes)
        if reply.params is not None:
            self.params = reply.params
        return reply

    def status(self) -> SessionStats:
        """This session's figures from the daemon's ``status``."""
        for entry in self._daemon.status(self.session_id).sessions:
            if entry.session_id == self.session_id:
                return entry
        raise DaemonError("unknown_session", f"the daemon's status has no session {self.session_id}")

    @property
    def pending_inputs(self) -> int | None:
        """Shared memory: frames sent that the daemon has not taken yet (more than the ring's slots means some were
        lost). A client replaying a file can wait for this to drop before sending more. None on the network."""
        if self._in_ring is None:
            return None
        written, read, _dropped = self._in_ring.header_counters()
        return max(0, written - read)

    @property
    def input_slots(self) -> int | None:
        """Shared memory: how many frames the daemon's input ring holds. None on the network."""
        return self.info.slots if self._in_ring is not None else None

    @property
    def frames_sent(self) -> int:
        return self._frames_sent

    @property
    def frames_received(self) -> int:
        return self._frames_received

    @property
    def current_fps(self) -> float:
        """Send rate over the last frames."""
        t = self._sent_times
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) >= 2 and t[-1] > t[0] else 0.0

    @property
    def closed(self) -> bool:
        return self._closed or self._lost is not None

    @property
    def daemon_alive(self) -> bool:
        return self._heartbeat.daemon_alive

    def _mark_lost(self, why: str) -> None:
        if self._lost is None and not self._closed:
            self._lost = why
            log.warning("%s", why)

    def close(self) -> None:
        """Close the session on the daemon (if it is still there) and let go of the transport. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._heartbeat.stop()
        closed_by_daemon = self._lost is not None
        try:
            closed_by_daemon = closed_by_daemon or (self._in_ring is not None and self._in_ring.closed_flag)
        except Exception:  # noqa: BLE001 - an unusable ring: ask the daemon anyway
            pass
        if not closed_by_daemon:
            try:  # short: a daemon that is gone has freed the session already (or will, by heartbeat timeout)
                self._daemon.close_session(self.session_id, timeout_s=min(self._daemon.timeout_s, CLOSE_TIMEOUT_S))
            except DaemonError as exc:
                log.debug("close_session %s: %s", self.session_id, exc)
        for ring in (self._in_ring, self._out_ring):
            if ring is not None:
                ring.close()
        for sock in (self._data, self._data_out):
            if sock is not None:
                sock.close(linger=0)
        self._heartbeat.join(timeout=2.0)

    def __enter__(self) -> SessionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: a forgotten session must not keep a heartbeat thread alive
        try:
            if not self._closed:
                self._heartbeat.stop()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return (
            f"SessionClient({self.session_id!r}, {self.width}x{self.height} {self.pixel_format}, "
            f"{self.transport}, sent={self._frames_sent}, received={self._frames_received})"
        )
