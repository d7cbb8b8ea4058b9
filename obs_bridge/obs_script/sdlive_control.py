"""The filter's control channel to the daemon: a ZMTP 3.0 DEALER written on the stdlib ``socket`` module.

The daemon's control socket is a ZeroMQ ROUTER; this speaks just enough of ZMTP 3.0 to be its DEALER: the greeting,
the NULL or PLAIN security handshake (RFC 23 and 24: a daemon with local auth, the default, takes the user's local
secret as PLAIN password, read by ``sdlive_secret``), single-frame JSON requests and replies, and PONGs for the
ROUTER's ZMTP PINGs. It is
the only control path of the OBS script: it runs in whatever Python OBS embeds, with no extra package to install,
and the daemon's IO thread answers every request on receipt, so a reply never waits for the model.

A request that gets no reply in time raises ``ControlError`` and the next request opens a fresh TCP connection
(the Paranoid Pirate pattern of the ZeroMQ Guide); whether the daemon is alive is for heartbeats to decide.
No OBS imports: the tests drive this module against real ZeroMQ routers outside OBS.

The mechanism follows the daemon's greeting: only the first 11 greeting bytes are sent before the peer's whole
greeting is in (ZMTP allows it), so the rest says NULL to a NULL daemon and PLAIN to a PLAIN one.
"""

from __future__ import annotations

import itertools
import json
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

REQUEST_TIMEOUT_S = 1.0  # default reply deadline, and the TCP connect + ZMTP handshake deadline

_FLAG_MORE, _FLAG_LONG, _FLAG_COMMAND = 0x01, 0x02, 0x04
_SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03"  # the first 11 bytes: signature and major version
_GREETING_SIZE = 64
_LOOPBACK = ("127.", "localhost", "::1")


def _greeting_rest(mechanism: bytes) -> bytes:
    """The greeting after its first 11 bytes: minor version, mechanism, as-server 0, filler."""
    return b"\x00" + mechanism.ljust(20, b"\x00") + b"\x00" * 32


_SECURED = ("it is a daemon started with --token (CurveZMQ), which the OBS filter cannot open: run "
            "`sdlive relay` on this computer and give the filter the relay's address (docs/obs.md, Dual-PC)")
_NO_SECRET = ("the daemon at {address} has local auth on (it takes only clients holding its user's local secret) and "
              "there is no secret file at {path} for OBS's user: run OBS as the same user as `sdlive serve`, or set "
              "SDLIVE_SECRET_FILE for OBS to the daemon's secret file (a sandboxed OBS such as Flatpak), or start the "
              "daemon with --no-local-auth on a single-user machine")
_WRONG_SECRET = ("the daemon at {address} refused this user's local secret ({path}; daemon said {reason}): the daemon "
                 "runs as another user or with another SDLIVE_SECRET_FILE. Run OBS and `sdlive serve` as the same "
                 "user with the same SDLIVE_SECRET_FILE (or none), or restart the daemon")


class ControlError(Exception):
    """The daemon did not answer (timeout, refused, connection lost): distinct from an error reply."""


class DaemonReplyError(Exception):
    """The daemon answered ``ok: false``; ``code`` is its stable error code (docs/protocol.md §4)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class RefusedError(ControlError):
    """Nothing listens at the address: the daemon is not running there (or exited a moment ago)."""


class LocalAuthError(ControlError):
    """A daemon with local auth cannot be opened: no secret, an unusable one, or a refused one (message: the fix).
    A ControlError, so the filter's link retries it with backoff and shows it once per kind."""


class _StaleConnection(ControlError):
    """A connection kept from an earlier request was closed by the daemon before anything came back on it."""


class StdlibControl:
    """One DEALER connection to ``tcp://HOST:PORT``. Not thread safe: one worker thread owns it."""

    def __init__(self, address: str, token: str | None, secret: Callable[[], str | None] | None = None):
        """``secret``: returns the PLAIN password for a daemon with local auth (default: this user's local secret,
        read afresh per connection on a loopback address, ``sdlive_secret``); raises OSError naming the fix."""
        url = urlparse(address)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise ValueError(f"daemon address {address!r}: the OBS filter connects to tcp://HOST:PORT addresses")
        self.address = address
        self.token = token or None
        self._secret = secret
        self._loopback = url.hostname.startswith(_LOOPBACK)
        self._host, self._port = url.hostname, url.port
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._buf = b""
        self._aborted = False

    # -- requests ------------------------------------------------------------------------------------------------
    def request(self, op: str, timeout_s: float = REQUEST_TIMEOUT_S, **fields: Any) -> dict[str, Any]:
        """Send one request and return its ``ok`` reply; DaemonReplyError for an error reply, ControlError when no
        reply came within ``timeout_s`` (the connection is then reset)."""
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"op": op, "id": msg_id, **fields}
        if self.token:
            msg["token"] = self.token
        data = json.dumps(msg).encode("utf-8")
        deadline = time.monotonic() + timeout_s
        self._aborted = False
        try:
            return self._exchange(op, msg_id, data, deadline, timeout_s)
        except _StaleConnection as exc:  # the daemon closed an idle connection just now (restart, heartbeat timeout)
            if self._aborted:
                raise ControlError(f"{op!r} to {self.address} aborted") from exc
            return self._exchange(op, msg_id, data, deadline, timeout_s)  # once more, on a fresh connection

    def _exchange(self, op: str, msg_id: int, data: bytes, deadline: float, timeout_s: float) -> dict[str, Any]:
        reused = self._send(data)
        heard = False
        while True:
            if time.monotonic() >= deadline:
                self._reset()
                raise ControlError(f"no reply to {op!r} from {self.address} within {timeout_s:.1f} s")
            try:
                raw = self._recv(deadline)
            except ControlError as exc:
                if reused and not heard:
                    raise _StaleConnection(str(exc)) from None
                raise
            if raw is None:
                continue
            heard = True
            try:
                reply = json.loads(raw.decode("utf-8"))
            except ValueError:
                continue
            if not isinstance(reply, dict) or reply.get("id") not in (msg_id, None):
                continue  # a late reply to an earlier request that timed out
            if not reply.get("ok", False):
                err = reply.get("error") or {}
                raise DaemonReplyError(str(err.get("code", "internal")), str(err.get("message", "")))
            return reply

    def close(self) -> None:
        self._reset()

    def abort(self) -> None:
        """From another thread: cut the connection, so a request waiting on it ends at once (ControlError)."""
        self._aborted = True  # no second try on a fresh connection for the request in flight
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def peer_closed(self) -> bool:
        """Between requests: True when the daemon closed the kept connection (it exited, or dropped this client);
        ZMTP PINGs that arrived meanwhile get their PONG."""
        if self._sock is None:
            return False
        self._drain()
        return self._sock is None

    # -- connection ----------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._buf = b""

    def _connect(self, timeout_s: float) -> socket.socket:
        try:
            sock = socket.create_connection((self._host, self._port), timeout=timeout_s)
        except ConnectionRefusedError as exc:
            raise RefusedError(f"cannot connect to {self.address}: {exc}") from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {self.address}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._buf = sock, b""
        deadline = time.monotonic() + timeout_s
        try:
            # The signature and major version first, the rest once the peer's whole greeting is in (as ZMTP
            # allows): a peer that wants another mechanism shows it before it hangs up on ours.
            sock.sendall(_SIGNATURE)
            while len(self._buf) < _GREETING_SIZE:
                self._recv_more(deadline)
            peer, self._buf = self._buf[:_GREETING_SIZE], self._buf[_GREETING_SIZE:]
            if peer[0:1] != b"\xff" or peer[9:10] != b"\x7f" or peer[10] < 3:
                raise ControlError(f"{self.address} does not speak ZMTP 3 (greeting {peer[:12]!r})")
            mechanism = peer[12:32].rstrip(b"\x00")
            metadata = _property(b"Socket-Type", b"DEALER") + _property(b"Identity", b"")
            if mechanism == b"NULL":
                sock.sendall(_greeting_rest(b"NULL"))
                self._send_frame(b"\x05READY" + metadata, command=True)
                self._await(b"READY", deadline, None)
            elif mechanism == b"PLAIN":
                self._plain(metadata, deadline)
            else:
                raise ControlError(f"{self.address} wants security mechanism "
                                   f"{mechanism.decode(errors='replace')}: {_SECURED}")
            return sock
        except ControlError:
            self._reset()
            raise
        except OSError as exc:  # a timeout included
            self._reset()
            raise ControlError(f"no ZMTP handshake with {self.address}: {exc or type(exc).__name__}") from None

    def _plain(self, metadata: bytes, deadline: float) -> None:
        """ZMTP PLAIN as its client (RFC 24): HELLO with user name and password, the server's WELCOME, INITIATE with
        the metadata, its READY; an ERROR (a wrong password) or a secret that cannot be read is a LocalAuthError."""
        read = self._secret
        path = "the secret given"
        username = b"sdlive"
        if read is None:
            import sdlive_secret  # the daemon's own secret.py, loaded by path (only when a daemon asks for it)

            path = "this user's local secret"
            try:
                path = sdlive_secret.secret_path()
                username = sdlive_secret.plain_username()
            except OSError as exc:
                raise LocalAuthError(f"cannot open the daemon at {self.address}: {exc}") from None
            read = sdlive_secret.read_secret if self._loopback else (lambda: None)
        try:
            secret = read()
        except OSError as exc:  # not private, unreadable, the contract's secret.py missing: the message says the fix
            raise LocalAuthError(f"cannot open the daemon at {self.address}: {exc}") from None
        if not secret:
            raise LocalAuthError(_NO_SECRET.format(address=self.address, path=path))
        password = secret.encode("utf-8")
        assert self._sock is not None
        self._sock.sendall(_greeting_rest(b"PLAIN"))
        self._send_frame(b"\x05HELLO" + bytes([len(username)]) + username + bytes([len(password)]) + password,
                         command=True)  # fmt: skip
        refused = _WRONG_SECRET.format(address=self.address, path=path, reason="{reason}")
        self._await(b"WELCOME", deadline, refused)
        self._send_frame(b"\x08INITIATE" + metadata, command=True)
        self._await(b"READY", deadline, refused)

    def _await(self, command: bytes, deadline: float, refused: str | None) -> None:
        """Read frames until the peer's ``command``; its ERROR raises ``refused`` (with the reason) when given."""
        while True:
            try:
                is_cmd, body, _more = self._read_frame(deadline)
            except ConnectionResetError:
                if refused is not None:  # a PLAIN server that drops us without an ERROR: the same refusal
                    raise LocalAuthError(refused.format(reason="nothing")) from None
                raise
            name = _command_name(body) if is_cmd else b""
            if name == command:
                return
            # An ERROR command (name, reason length, reason: the ZAP status, "400"). libzmq 4.3 sends it one byte
            # short ("^RROR\x03400", the name's length byte lost), hence the search for the name's tail.
            at = body.find(b"RROR", 0, 6) if is_cmd else -1
            if at >= 0:
                start = at + 4
                reason = body[start + 1 : start + 1 + body[start]].decode(errors="replace") if len(body) > start else ""
                if refused is not None:
                    raise LocalAuthError(refused.format(reason=repr(reason)))
                raise ControlError(f"{self.address} refused the handshake: {reason!r}")

    def _send(self, data: bytes) -> bool:
        """Send one message; True when it went over a connection kept from an earlier request (one the daemon may
        have closed a moment ago: the caller asks again once if nothing comes back on it)."""
        self._drain()
        reused = self._sock is not None
        if not reused:
            self._connect(REQUEST_TIMEOUT_S)
        try:
            self._send_frame(data)
        except OSError as exc:
            self._reset()
            raise (_StaleConnection if reused else ControlError)(f"lost the connection to {self.address}: {exc}") from None
        return reused

    def _recv(self, deadline: float) -> bytes | None:
        """The last frame of the next message (ZMTP commands answered on the way), or None at ``deadline``."""
        if self._sock is None:
            raise ControlError(f"not connected to {self.address}")
        try:
            while True:
                is_cmd, body, more = self._read_frame(deadline)
                if is_cmd:
                    self._answer_command(body)
                elif not more:
                    return body
        except TimeoutError:
            return None
        except OSError as exc:
            self._reset()
            raise ControlError(f"lost the connection to {self.address}: {exc}") from None

    def _drain(self) -> None:
        """Before a request: take what arrived while idle (ZMTP PINGs get their PONG, late replies are dropped);
        a connection the daemon closed meanwhile (restart, heartbeat timeout) is reset, not reported."""
        try:
            while self._sock is not None and select.select([self._sock], [], [], 0)[0]:
                chunk = self._sock.recv(65536)
                if not chunk:
                    self._reset()
                    return
                self._buf += chunk
                while (frame := self._parse_buffered_frame()) is not None:  # a partial frame waits in _buf
                    if frame[0]:
                        self._answer_command(frame[1])
        except OSError:
            self._reset()

    # -- frames --------------------------------------------------------------------------------------------------
    def _answer_command(self, body: bytes) -> None:
        """ZMTP 3.1 heartbeat: a PING gets a PONG carrying the ping's context; other commands need nothing."""
        if _command_name(body) == b"PING":
            self._send_frame(b"\x04PONG" + body[1 + body[0] + 2 :], command=True)

    def _send_frame(self, body: bytes, *, command: bool = False, more: bool = False) -> None:
        assert self._sock is not None
        flags = (_FLAG_COMMAND if command else 0) | (_FLAG_MORE if more else 0)
        if len(body) > 255:
            head = bytes([flags | _FLAG_LONG]) + struct.pack(">Q", len(body))
        else:
            head = bytes([flags, len(body)])
        self._sock.sendall(head + body)

    def _recv_more(self, deadline: float) -> None:
        """Append what the socket has to the buffer, waiting until ``deadline`` (monotonic seconds) at most."""
        assert self._sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self._sock.settimeout(left)
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("daemon closed the connection")
        self._buf += chunk

    def _read_frame(self, deadline: float) -> tuple[bool, bytes, bool]:
        """The next complete frame (is_command, body, more). On timeout nothing is consumed: a frame that arrives
        in pieces is completed by the next call."""
        while True:
            frame = self._parse_buffered_frame()
            if frame is not None:
                return frame
            self._recv_more(deadline)

    def _parse_buffered_frame(self) -> tuple[bool, bytes, bool] | None:
        """Take one complete frame off the receive buffer: (is_command, body, more), or None if incomplete."""
        buf = self._buf
        if len(buf) < 2:
            return None
        flags = buf[0]
        if flags & _FLAG_LONG:
            if len(buf) < 9:
                return None
            size, head = struct.unpack(">Q", buf[1:9])[0], 9
        else:
            size, head = buf[1], 2
        if len(buf) < head + size:
            return None
        self._buf = buf[head + size :]
        return bool(flags & _FLAG_COMMAND), buf[head : head + size], bool(flags & _FLAG_MORE)


def _property(name: bytes, value: bytes) -> bytes:
    """A ZMTP metadata property: name length, name, 4-byte value length, value."""
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


def _command_name(body: bytes) -> bytes:
    return body[1 : 1 + body[0]] if body else b""
