"""Server-side socket security: one :class:`SocketAuth` per daemon, applied to every socket it binds.

With a secret (the ``--token``, or the local secret when ``--local-auth`` is on) each socket becomes a CurveZMQ
server whose keys derive from the secret (``protocol.secret.curve_keys``), and a ZAP handler
(``zmq.auth.thread.ThreadAuthenticator``, pyzmq's own) admits only the client key the same secret derives. A peer
without the secret never completes the handshake: ZeroMQ hands the daemon no message from it and sends it none,
on the control ROUTER, the PUB and every network session's PULL/PUSH alike. Without a secret the sockets stay plain
(loopback only: ``config.py`` refuses a non-loopback bind without a token).

Usage (every bound socket, before ``bind``)::

    auth = SocketAuth(ctx, secret)   # starts the ZAP thread when secret is set
    auth.secure(sock)                # CURVE server + ZAP domain; a no-op without a secret
    ...
    auth.stop()                      # after the sockets are closed
"""

from __future__ import annotations

import hmac
import logging
import threading

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..protocol.secret import CurveKeys, curve_keys

log = logging.getLogger(__name__)

ZAP_DOMAIN = "sdlive"
_REFUSAL_LOG_INTERVAL = 100
"""Log the first refused handshake, then every this many (a port scanner must not flood the log)."""


class _ClientKey:
    """pyzmq's ZAP credentials provider: admit exactly one client public key, count the others."""

    def __init__(self, allowed: bytes) -> None:
        self.allowed = allowed
        self.refused = 0
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        if hmac.compare_digest(key, self.allowed):
            return True
        with self._lock:
            self.refused += 1
            refused = self.refused
        if refused == 1 or refused % _REFUSAL_LOG_INTERVAL == 0:
            log.warning("refused a connection with the wrong key (%d so far): a client without this daemon's "
                        "token or local secret", refused)  # fmt: skip
        return False


class SocketAuth:
    """The daemon's CurveZMQ + ZAP setup for one ZeroMQ context (see the module docstring)."""

    def __init__(self, ctx: zmq.Context, secret: str | None) -> None:
        self.ctx = ctx
        self.keys: CurveKeys | None = curve_keys(secret) if secret else None
        self._provider: _ClientKey | None = None
        self._authenticator: ThreadAuthenticator | None = None
        if self.keys is not None:
            self._provider = _ClientKey(self.keys.client_public)
            self._authenticator = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
            self._authenticator.start()
            self._authenticator.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self._provider)

    @property
    def enabled(self) -> bool:
        """True when sockets are CurveZMQ servers (a secret is set)."""
        return self.keys is not None

    @property
    def refused(self) -> int:
        """Handshakes refused so far (wrong or missing keys)."""
        return self._provider.refused if self._provider is not None else 0

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CurveZMQ server checked by the ZAP handler; call before ``bind``. No-op without a secret."""
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
