"""Server-side socket security: one :class:`SocketAuth` per daemon, applied to every socket it binds.

With the ``--token`` each socket becomes a CurveZMQ server whose keys derive from the token
(``protocol.secret.curve_keys``), and a ZAP handler (``zmq.auth.thread.ThreadAuthenticator``, pyzmq's own) admits
only the client key the same token derives. With local auth and no token (loopback only: ``config.py`` refuses a
non-loopback bind without a token) each socket is a ZMTP PLAIN server and the ZAP handler admits only the local
secret as password, compared in constant time. A peer without the secret never completes the handshake: ZeroMQ
hands the daemon no message from it and sends it none, on the control ROUTER, the PUB and every network session's
PULL/PUSH alike. Without either the sockets stay NULL (``--no-local-auth``).

Usage (every bound socket, before ``bind``)::

    auth = SocketAuth(ctx, secret, "curve")   # or "plain"; starts the ZAP thread when secret is set
    auth.secure(sock)                         # CURVE/PLAIN server + ZAP domain; a no-op without a secret
    ...
    auth.stop()                      # after the sockets are closed
"""

from __future__ import annotations

import hmac
import logging
import threading

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..protocol.secret import CurveKeys, Mechanism, curve_keys

log = logging.getLogger(__name__)

ZAP_DOMAIN = "sdlive"
_REFUSAL_LOG_INTERVAL = 100
"""Log the first refused handshake, then every this many (a port scanner must not flood the log)."""


class _ClientKey:
    """pyzmq's ZAP credentials provider: admit exactly one client public key (CURVE) or password (PLAIN), count
    the others."""

    def __init__(self, allowed: bytes) -> None:
        self.allowed = allowed
        self.refused = 0
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        if hmac.compare_digest(key, self.allowed):
            return True
        self.count_refusal()
        return False

    def count_refusal(self) -> None:
        with self._lock:
            self.refused += 1
            refused = self.refused
        if refused == 1 or refused % _REFUSAL_LOG_INTERVAL == 0:
            log.warning("refused a connection with the wrong key (%d so far): a client without this daemon's "
                        "token or local secret", refused)  # fmt: skip


class _PlainAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, with PLAIN checked by :class:`_ClientKey` (constant time, counted, never logged:
    pyzmq's own PLAIN check logs the password at debug level)."""

    provider: _ClientKey | None = None

    def _authenticate_plain(self, domain: str, username: str, password: str) -> tuple[bool, bytes]:
        assert self.provider is not None
        if self.provider.callback(domain, password.encode("utf-8", "surrogateescape")):
            return True, b"OK"
        return False, b"wrong local secret"


class SocketAuth:
    """The daemon's CurveZMQ + ZAP setup for one ZeroMQ context (see the module docstring)."""

    def __init__(self, ctx: zmq.Context, secret: str | None, mechanism: Mechanism = "curve") -> None:
        self.ctx = ctx
        self.mechanism: Mechanism = mechanism if secret else "none"
        """``curve`` (a token), ``plain`` (the local secret) or ``none``."""
        self.keys: CurveKeys | None = curve_keys(secret) if secret and mechanism == "curve" else None
        self._provider: _ClientKey | None = None
        self._authenticator: ThreadAuthenticator | None = None
        zap_log = logging.getLogger(f"{__name__}.zap")
        if self.keys is not None:
            self._provider = _ClientKey(self.keys.client_public)
            self._authenticator = ThreadAuthenticator(ctx, log=zap_log)
            self._authenticator.start()
            self._authenticator.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self._provider)
        elif secret and mechanism == "plain":
            self._provider = _ClientKey(secret.encode("utf-8", "surrogateescape"))
            plain = _PlainAuthenticator(ctx, log=zap_log)
            plain.provider = self._provider
            self._authenticator = plain
            plain.start()  # no configure_plain: _authenticate_plain above decides every PLAIN handshake
        elif secret:
            raise ValueError(f"unknown socket security {mechanism!r} (curve or plain)")

    @property
    def enabled(self) -> bool:
        """True when sockets are secured (CurveZMQ or PLAIN)."""
        return self.mechanism != "none"

    @property
    def refused(self) -> int:
        """Handshakes refused so far (wrong or missing keys)."""
        return self._provider.refused if self._provider is not None else 0

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CurveZMQ or PLAIN server checked by the ZAP handler; call before ``bind``. No-op without a
        secret."""
        if self.mechanism == "plain":
            sock.zap_domain = ZAP_DOMAIN.encode()
            sock.plain_server = True
            return
        if self.keys is None:
            return
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.curve_secretkey = self.keys.server_secret
        sock.curve_publickey = self.keys.server_public
        sock.curve_server = True

    def stop(self) -> None:
        """Stop the ZAP thread (after every secured socket is closed). Idempotent."""
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
