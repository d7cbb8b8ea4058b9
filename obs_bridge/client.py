"""Client library for the sdlive daemon: control over ZeroMQ, frames over shared memory or the network.

::

    from sdlive.obs_bridge.client import DaemonClient

    with DaemonClient() as daemon:                       # tcp://127.0.0.1:5557
        with daemon.open_session(width=512, height=512, fps=30, preset="anime") as session:
            session.send(frame)                          # H×W×3 uint8, BGR by default
            out = session.recv(timeout_s=1.0)            # Frame(seq, timestamp_ns, pixels) or None
            session.set_preset("watercolor")

Control is a DEALER socket sending one JSON frame per request (``docs/protocol.md``). When the daemon does not
answer in ``timeout_s`` the socket is thrown away (LINGER 0) and a fresh one is made for the next request (the
ZeroMQ Guide's Lazy/Paranoid Pirate), and :class:`DaemonUnavailable` says so and how to fix it.

A session sends heartbeats from a background thread on its own socket (interval 1 s, liveness 3, capped doubling
reconnect backoff); the daemon closes a session whose client goes silent, and unlinks its shared memory.

No torch here: this module runs on an OBS box without the GPU extra.
"""

from __future__ import annotations

import itertools
import json
import logging
import operator
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONTROL_ADDRESS",
    "PROTOCOL_VERSION",
    "DaemonClient",
    "DaemonError",
    "DaemonUnavailable",
    "Frame",
    "SessionClient",
]

PROTOCOL_VERSION = "sdlive/1"
DEFAULT_CONTROL_ADDRESS = "tcp://127.0.0.1:5557"

HEARTBEAT_INTERVAL_S = 1.0
"""Paranoid Pirate: a heartbeat a second ..."""
HEARTBEAT_LIVENESS = 3
"""... and the peer is presumed gone after this many missed in a row."""
RECONNECT_INTERVAL_INIT_S = 1.0
RECONNECT_INTERVAL_MAX_S = 32.0
"""Reconnect backoff doubles from INIT up to MAX."""

CLOSE_TIMEOUT_S = 2.0
"""``SessionClient.close`` waits at most this for the daemon's answer."""

PIXEL_CHANNELS = {"bgra": 4, "rgba": 4, "rgb24": 3, "bgr24": 3}
TRANSPORTS = ("auto", "shm", "net")


class DaemonError(Exception):
    """The daemon answered with an error (``code`` is one of the protocol's stable codes)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DaemonUnavailable(DaemonError, ConnectionError):
    """No daemon answered at the address."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


@dataclass(frozen=True)
class Frame:
    """A restyled frame: ``seq`` counts output frames from 1, ``timestamp_ns`` is its input's capture time."""

    seq: int
    timestamp_ns: int
    pixels: np.ndarray


def is_loopback_address(address: str) -> bool:
    """True when a ZeroMQ endpoint is on this machine (loopback IP or name, ipc://, inproc://)."""
    import ipaddress

    if not address.startswith("tcp://"):
        return True
    rest = address[len("tcp://") :]
    host = rest[1 : rest.index("]")] if rest.startswith("[") else rest.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same_host(control: str, endpoint: str) -> str:
    """``endpoint``'s port on the host of ``control`` (both tcp://HOST:PORT)."""
    if not (control.startswith("tcp://") and endpoint.startswith("tcp://")):
        return endpoint
    host = control[len("tcp://") :].rsplit(":", 1)[0]
    return f"tcp://{host}:{endpoint.rsplit(':', 1)[1]}"


def _unavailable(address: str, timeout_s: float) -> DaemonUnavailable:
    return DaemonUnavailable(
        f"no sdlive daemon answered at {address} within {timeout_s:g} s: start one with `sdlive serve` "
        f"(or point the client at the right address / check the firewall for a remote daemon)"
    )


class _Channel:
    """One DEALER socket doing request/reply with timeouts; replaced by a fresh socket after a timeout."""

    def __init__(self, ctx: zmq.Context, address: str, *, token: str | None, timeout_s: float) -> None:
        self.ctx = ctx
        self.address = address
        self.token = token
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._socket: zmq.Socket | None = None

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.connect(self.address)
            self._socket = sock
        return self._socket

    def reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def request(self, op: str, *, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            request_id = next(self._ids)
            message: dict[str, Any] = {"op": op, "id": request_id}
            if self.token is not None:
                message["token"] = self.token
            message.update({k: v for k, v in fields.items() if v is not None})
            payload = json.dumps(message).encode("utf-8")
            sock = self._connect()
            deadline = time.monotonic() + timeout_s
            try:
                sock.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                # IMMEDIATE: no connected peer yet; wait for one until the deadline.
                while True:
                    if time.monotonic() >= deadline:
                        self.reset()
                        raise _unavailable(self.address, timeout_s) from None
                    if sock.poll(50, zmq.POLLOUT):
                        sock.send(payload)
                        break
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                    self.reset()
                    raise _unavailable(self.address, timeout_s)
                frames = sock.recv_multipart()
                try:
                    reply = json.loads(frames[-1])
                except (ValueError, UnicodeDecodeError):
                    log.warning("ignoring a reply that is not JSON from %s", self.address)
                    continue
                if not isinstance(reply, dict) or reply.get("id") not in (request_id, None):
                    continue  # a late reply to a request that timed out
                if reply.get("ok"):
                    return reply
                error = reply.get("error") or {}
                raise DaemonError(str(error.get("code", "internal")), str(error.get("message", "no message")))

    def close(self) -> None:
        with self._lock:
            self.reset()


class DaemonClient:
    """Control connection to an sdlive daemon (thread-safe: requests are serialised)."""

    def __init__(
        self, address: str = DEFAULT_CONTROL_ADDRESS, *, token: str | None = None, timeout_s: float = 5.0
    ) -> None:
        if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"daemon address {address!r} is not a ZeroMQ endpoint like {DEFAULT_CONTROL_ADDRESS}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.address = address
        self.token = token if token is not None else os.environ.get("SDLIVE_TOKEN") or None
        self.timeout_s = timeout_s
        self._ctx = zmq.Context.instance()
        self._channel = _Channel(self._ctx, address, token=self.token, timeout_s=timeout_s)
        self._closed = False

    # ------------------------------------------------------------------ requests

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send any request; returns the reply dict or raises :class:`DaemonError` / :class:`DaemonUnavailable`."""
        if self._closed:
            raise DaemonError("closed", "this DaemonClient is closed")
        return self._channel.request(op, **fields)

    def hello(self) -> dict[str, Any]:
        reply = self.request("hello", protocol=PROTOCOL_VERSION)
        if reply.get("protocol") not in (None, PROTOCOL_VERSION):
            raise DaemonError(
                "bad_request",
                f"daemon speaks {reply.get('protocol')!r}, this client {PROTOCOL_VERSION!r}: upgrade sdlive on both sides",
            )
        return reply

    def list_presets(self) -> list[dict[str, Any]]:
        return list(self.request("list_presets").get("presets", []))

    def status(self, session_id: str | None = None) -> dict[str, Any]:
        return self.request("status", session_id=session_id)

    def set_preset(self, session_id: str, name: str) -> dict[str, Any]:
        return self.request("set_preset", session_id=session_id, name=name)

    def set_params(self, session_id: str, **params: Any) -> dict[str, Any]:
        return self.request("set_params", session_id=session_id, **params)

    def close_session(self, session_id: str) -> dict[str, Any]:
        return self.request("close_session", session_id=session_id)

    def heartbeat(self, session_id: str | None = None) -> dict[str, Any]:
        return self.request("heartbeat", session_id=session_id)

    def shutdown(self) -> dict[str, Any]:
        return self.request("shutdown")

    def open_session(
        self,
        *,
        width: int,
        height: int,
        fps: float,
        pixel_format: str = "bgr24",
        preset: str | None = None,
        params: dict[str, Any] | None = None,
        transport: str = "auto",
        client: str | None = None,
        jpeg_quality: int | None = None,
    ) -> SessionClient:
        """Open a session and attach to its frame transport.

        ``transport="auto"`` uses shared memory when the daemon address is loopback, the network otherwise (and
        falls back to the network when the shared memory cannot be opened, e.g. from another container).
        ``jpeg_quality`` (network only) sends JPEG at that quality instead of raw pixels, both directions.
        """
        if pixel_format not in PIXEL_CHANNELS:
            raise ValueError(f"unknown pixel format {pixel_format!r}: use one of {', '.join(PIXEL_CHANNELS)}")
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}: use one of {', '.join(TRANSPORTS)}")
        if jpeg_quality is not None and not 1 <= int(jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
        chosen = transport
        if transport == "auto":
            chosen = "shm" if is_loopback_address(self.address) and jpeg_quality is None else "net"
        try:  # numpy integers are fine, floats are not (frames have whole pixel sizes)
            width, height = operator.index(width), operator.index(height)
        except TypeError:
            raise TypeError(f"width and height must be integers, got {width!r} x {height!r}") from None
        fields = dict(
            width=width,
            height=height,
            fps=float(fps),
            pixel_format=pixel_format,
            preset=preset,
            params=params,
            client=client or f"python-{os.getpid()}",
        )
        reply = self.request(
            "open_session", transport=chosen, encoding="jpeg" if jpeg_quality and chosen == "net" else None, **fields
        )
        try:
            return SessionClient(self, reply, jpeg_quality=jpeg_quality)
        except _ShmUnavailable as exc:
            try:
                self.close_session(reply["session_id"])
            except DaemonError:
                pass
            if transport != "auto":
                raise DaemonError("internal", str(exc)) from exc
            log.info("shared memory not reachable (%s); using the network transport", exc)
            reply = self.request(
                "open_session", transport="net", encoding="jpeg" if jpeg_quality else None, **fields
            )
            return SessionClient(self, reply, jpeg_quality=jpeg_quality)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DaemonClient({self.address!r})"


class _ShmUnavailable(Exception):
    pass


class _Heartbeat(threading.Thread):
    """Paranoid Pirate heartbeats for one session, on a DEALER socket of its own.

    One heartbeat per interval; any reply counts as life. After ``HEARTBEAT_LIVENESS`` silent intervals the daemon
    is presumed gone: the socket is replaced (LINGER 0) and retried with a doubling backoff capped at
    ``RECONNECT_INTERVAL_MAX_S``. The socket is kept across slow replies (a busy machine), never reset per request.
    """

    def __init__(self, session: SessionClient, address: str, token: str | None, interval_s: float) -> None:
        super().__init__(name=f"sdlive-heartbeat-{session.session_id}", daemon=True)
        self._session = session
        self._address = address
        self._token = token
        self._interval_s = interval_s
        self._halt = threading.Event()
        self.daemon_alive = True

    def _socket(self) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._address)
        return sock

    def run(self) -> None:
        sock = self._socket()
        liveness = HEARTBEAT_LIVENESS
        backoff = RECONNECT_INTERVAL_INIT_S
        message: dict[str, Any] = {"op": "heartbeat", "session_id": self._session.session_id}
        if self._token is not None:
            message["token"] = self._token
        payload = json.dumps(message).encode("utf-8")
        try:
            while not self._halt.is_set():
                try:
                    sock.send(payload, zmq.NOBLOCK)
                except zmq.Again:
                    pass  # not connected yet: this interval counts as silent
                deadline = time.monotonic() + self._interval_s
                heard = False
                while (remaining := deadline - time.monotonic()) > 0 and not self._halt.is_set():
                    if not sock.poll(int(remaining * 1000) + 1):
                        continue
                    try:
                        reply = json.loads(sock.recv_multipart()[-1])
                    except (ValueError, UnicodeDecodeError):
                        continue
                    heard = True
                    error = reply.get("error") if isinstance(reply, dict) else None
                    if error and error.get("code") == "unknown_session":
                        self._session._mark_lost(
                            f"session {self._session.session_id} was closed by the daemon: {error.get('message')}"
                        )
                        return
                if heard:
                    liveness = HEARTBEAT_LIVENESS
                    backoff = RECONNECT_INTERVAL_INIT_S
                    self.daemon_alive = True
                    continue
                liveness -= 1
                if liveness > 0:
                    continue
                if self.daemon_alive:
                    log.warning("daemon at %s silent for %d heartbeats; reconnecting", self._address, HEARTBEAT_LIVENESS)
                self.daemon_alive = False
                sock.close(linger=0)
                if self._halt.wait(backoff):
                    return
                backoff = min(backoff * 2, RECONNECT_INTERVAL_MAX_S)
                sock = self._socket()
                liveness = HEARTBEAT_LIVENESS
        finally:
            sock.close(linger=0)

    def stop(self) -> None:
        self._halt.set()


class SessionClient:
    """One open session: ``send`` input frames, ``recv`` restyled frames, change the style live."""

    def __init__(self, daemon: DaemonClient, reply: dict[str, Any], *, jpeg_quality: int | None = None) -> None:
        self._daemon = daemon
        self.info = reply
        self.session_id: str = reply["session_id"]
        self.width: int = int(reply["width"])
        self.height: int = int(reply["height"])
        self.fps: float = float(reply.get("fps") or 30.0)
        self.pixel_format: str = reply.get("pixel_format", "bgr24")
        self.channels = PIXEL_CHANNELS[self.pixel_format]
        self.latency_frames: int = int(reply.get("latency_frames", 0))
        self.transport: str = reply.get("transport", "shm")
        self.preset: str | None = reply.get("preset")
        self.jpeg_quality = jpeg_quality
        self._shape = (self.height, self.width, self.channels)
        self._frames_sent = 0
        self._frames_received = 0
        self._closed = False
        self._lost: str | None = None
        self._in_ring = self._out_ring = None
        self._data: zmq.Socket | None = None
        self._data_out: zmq.Socket | None = None
        self.encoding: str = reply.get("encoding") or (reply.get("net") or {}).get("encoding") or "raw"
        self._send_dropped = 0
        self._net_seq = 0
        self._sent_times: list[float] = []
        if self.transport == "shm":
            self._open_rings(reply)
        else:
            self._open_data(reply)
        interval = float(reply.get("heartbeat_interval_s") or HEARTBEAT_INTERVAL_S)
        self._heartbeat = _Heartbeat(self, daemon.address, daemon.token, interval)
        self._heartbeat.start()

    def _open_rings(self, reply: dict[str, Any]) -> None:
        from sdlive.daemon.protocol.ring import FrameRing, RingError

        try:
            self._in_ring = FrameRing.open(reply["input_ring"])
            self._out_ring = FrameRing.open(reply["output_ring"])
        except (RingError, OSError) as exc:
            if self._in_ring is not None:
                self._in_ring.close()
            raise _ShmUnavailable(f"cannot open the session's shared memory: {exc}") from exc

    def _open_data(self, reply: dict[str, Any]) -> None:
        net = reply.get("net") or {}
        if not net.get("input_address") or not net.get("output_address"):
            raise DaemonError("internal", "the daemon gave no frame endpoints for a network session")
        ctx = zmq.Context.instance()
        # The daemon may bind a wildcard (tcp://0.0.0.0:…): reach each port by the host control was reached on.
        self.input_address = _same_host(self._daemon.address, net["input_address"])
        self.output_address = _same_host(self._daemon.address, net["output_address"])
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, 4)
        push.connect(self.input_address)
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 16)
        pull.connect(self.output_address)
        self._data, self._data_out = push, pull

    # ------------------------------------------------------------------ frames

    def _check_live(self) -> None:
        if self._closed:
            raise DaemonError("closed", f"session {self.session_id} is closed")
        if self._lost is not None:
            raise DaemonError("unknown_session", self._lost)
        if self._in_ring is not None and self._in_ring.closed_flag:
            self._mark_lost(f"session {self.session_id} was closed by the daemon")
            raise DaemonError("unknown_session", self._lost or "")

    def _check_frame(self, frame: Any) -> np.ndarray:
        if not isinstance(frame, np.ndarray):
            raise TypeError(f"frame must be a numpy array, not {type(frame).__name__}")
        if frame.dtype != np.uint8:
            raise ValueError(f"unexpected frame dtype: {frame.dtype} != uint8")
        if frame.shape != self._shape:
            raise ValueError(
                f"unexpected frame shape: {frame.shape} != {self._shape} "
                f"(the session is {self.width}x{self.height} {self.pixel_format})"
            )
        return np.ascontiguousarray(frame)

    def send(self, frame: np.ndarray, timestamp_ns: int | None = None) -> int:
        """Hand one input frame to the daemon (never blocks); returns its sequence number (1, 2, …)."""
        self._check_live()
        frame = self._check_frame(frame)
        if timestamp_ns is None:
            timestamp_ns = time.monotonic_ns()
        if self._in_ring is not None:
            seq = self._in_ring.write(frame, timestamp_ns=timestamp_ns)
        else:
            from sdlive.daemon.protocol import netframe

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

    def recv(self, timeout_s: float = 1.0) -> Frame | None:
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
                    return Frame(got.seq, got.timestamp_ns, pixels)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                ring.wait(min(remaining, 0.05), poll_s=0.001)
                self._check_live()
        assert self._data_out is not None
        from sdlive.daemon.protocol import netframe

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
            return Frame(int(header.seq), int(header.timestamp_ns), np.array(pixels))

    # ------------------------------------------------------------------ control

    def set_preset(self, name: str) -> dict[str, Any]:
        self._check_live()
        reply = self._daemon.set_preset(self.session_id, name)
        self.preset = name
        return reply

    def set_params(self, **params: Any) -> dict[str, Any]:
        self._check_live()
        return self._daemon.set_params(self.session_id, **params)

    def status(self) -> dict[str, Any]:
        return self._daemon.status(self.session_id)

    @property
    def pending_inputs(self) -> int | None:
        """Shared memory: frames sent that the daemon has not taken yet (more than the ring's slots means some were
        lost). A client replaying a file can wait for this to drop before sending more. None on the network."""
        if self._in_ring is None:
            return None
        written, read, _dropped = self._in_ring.header_counters()
        return max(0, written - read)

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
        if self._lost is None:
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
                self._daemon._channel.request(
                    "close_session", timeout_s=min(self._daemon.timeout_s, CLOSE_TIMEOUT_S), session_id=self.session_id
                )
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

    def __exit__(self, *exc: Any) -> None:
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
