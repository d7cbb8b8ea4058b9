"""Who may talk to a daemon: the per-user local secret, and how every socket is secured with a secret.

Stdlib only at import, like ``constants.py`` and ``ring.py``: the OBS script can load this single file by path.
Only :func:`curve_keys`, :func:`secure_client_socket` and :func:`describe_handshake_failure` need pyzmq, imported
when they are called.

**The rule** (docs/security.md). A daemon secures *every* socket it binds (control ROUTER, PUB, and each network
session's frame sockets):

- with a token (``--token``, required off loopback): **CurveZMQ**, keys derived from the token, so no key files
  travel and the traffic is encrypted;
- else with local auth (on by default, loopback only): ZMTP **PLAIN** with the per-user local secret as the
  password. Loopback traffic never leaves the machine and other unprivileged accounts cannot sniff it, so PLAIN's
  cleartext is acceptable there, and a stdlib client (the OBS script) can speak it;
- else (``--no-local-auth``): nothing (NULL).

A peer without the secret cannot complete the handshake, and ZeroMQ delivers nothing from it. A client does, for
every socket it connects to a daemon::

    mechanism, secret = client_security(token, is_loopback_address(address))  # token → curve, local secret file → plain, else none
    if secret is not None:
        secure_client_socket(sock, secret, mechanism)      # before sock.connect(...)

**The local secret** is a random string in a file only its owner can read (0600, in a 0700 folder):
``$XDG_RUNTIME_DIR/sdlive/secret`` when that runtime dir exists, else ``~/.local/state/sdlive/secret``
(Windows: ``%LOCALAPPDATA%\\sdlive\\secret``). The daemon creates it (:func:`ensure_local_secret`) and keeps it
across restarts; local clients read it themselves (:func:`read_local_secret`), so another account on the same
machine, which cannot read the file, cannot drive the daemon over loopback.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Any, Literal, NamedTuple

__all__ = [
    "LOCAL_SECRET_ENV",
    "CurveKeys",
    "PLAIN_USERNAME",
    "LocalSecretError",
    "Mechanism",
    "client_security",
    "curve_keys",
    "describe_handshake_failure",
    "ensure_local_secret",
    "local_secret_path",
    "read_local_secret",
    "secure_client",
    "secure_client_socket",
]

LOCAL_SECRET_ENV = "SDLIVE_SECRET_FILE"
"""Overrides where the local secret lives (tests, containers that share a runtime dir by another path)."""
_SECRET_BYTES = 32
PLAIN_USERNAME = "sdlive"
"""The ZMTP PLAIN user name clients send with the local secret (the daemon checks only the password)."""
PLAIN_MAX_BYTES = 255
"""ZMTP PLAIN carries the password with a one-byte length."""
Mechanism = Literal["curve", "plain", "none"]
"""How a socket is secured: CurveZMQ (a token), ZMTP PLAIN (the local secret, loopback only), nothing."""
_KEY_LABELS = (b"sdlive/curve/server\0", b"sdlive/curve/client\0")


class LocalSecretError(OSError):
    """The local secret file or its folder is unusable or not private; the message names the path and the fix."""


# ------------------------------------------------------------------------------------------------- local secret


def local_secret_path() -> Path:
    """Where this user's local secret lives (the file may not exist yet)."""
    override = os.environ.get(LOCAL_SECRET_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "sdlive" / "secret"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "sdlive" / "secret"
    return Path.home() / ".local" / "state" / "sdlive" / "secret"


def read_local_secret(path: Path | None = None) -> str | None:
    """The local secret, or None when there is none (no daemon with local auth ran for this user).

    Raises :class:`LocalSecretError` when the file exists but is not private to this user (someone else could
    read it, so it protects nothing) or cannot be read."""
    path = path or local_secret_path()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalSecretError(f"cannot read the local secret {path}: {exc.strerror}") from None
    try:
        _check_private(path, os.fstat(fd), kind="file")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    text = data.decode("ascii", errors="replace").strip()
    if not text:
        raise LocalSecretError(f"the local secret {path} is empty: delete it and restart the daemon")
    if len(text.encode("utf-8")) > PLAIN_MAX_BYTES:
        raise LocalSecretError(f"the local secret {path} is longer than {PLAIN_MAX_BYTES} bytes: delete it and "
                               "restart the daemon (it writes a new one)")  # fmt: skip
    return text


def client_security(token: str | None, loopback: bool, path: Path | None = None) -> tuple[Mechanism, str | None]:
    """How a client secures its sockets to a daemon: an explicit token → ``("curve", token)``; else, for a daemon
    on a loopback address (``constants.is_loopback_address``), this user's local secret file → ``("plain",
    secret)``; else ``("none", None)``.

    Raises :class:`LocalSecretError` for a local secret file that exists but is unusable (not private, empty)."""
    if token:
        return "curve", token
    if loopback:
        secret = read_local_secret(path)
        if secret is not None:
            return "plain", secret
    return "none", None


def ensure_local_secret(path: Path | None = None) -> str:
    """The daemon side: read the local secret, creating it (0600 in a 0700 folder, written atomically) if absent.
    Raises :class:`LocalSecretError` when the folder or file is not private to this user."""
    path = path or local_secret_path()
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalSecretError(f"cannot create {folder} for the local secret: {exc.strerror}") from None
    _check_private(folder, os.stat(folder), kind="folder")
    existing = read_local_secret(path)
    if existing is not None:
        return existing
    value = secrets.token_urlsafe(_SECRET_BYTES)
    tmp = folder / f".secret-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, value.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic and never replaces: a daemon starting at the same time keeps its secret
    except FileExistsError:
        pass
    except OSError:  # no hard links here (some filesystems, Windows): a rename, which may replace, is the fallback
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    result = read_local_secret(path)
    assert result is not None
    return result


def _check_private(path: Path, st: os.stat_result, *, kind: str) -> None:
    """POSIX: owned by this user, no access for group or others. (Windows: the profile folder's ACLs do this.)"""
    if not hasattr(os, "geteuid"):
        return
    if st.st_uid != os.geteuid():
        raise LocalSecretError(
            f"the local secret {kind} {path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): "
            f"it may be someone else's; remove it, or set {LOCAL_SECRET_ENV} to a path of your own"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        fix = "chmod 700" if kind == "folder" else "chmod 600"
        raise LocalSecretError(
            f"the local secret {kind} {path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
            f"run `{fix} {path}` (and restart the daemon if you think the secret leaked, after deleting it)"
        )


# ------------------------------------------------------------------------------------------------ CurveZMQ keys


class CurveKeys(NamedTuple):
    """The key pairs derived from one secret, Z85-encoded as pyzmq's socket options take them."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def curve_keys(secret: str) -> CurveKeys:
    """Both CurveZMQ key pairs a secret stands for (needs pyzmq with CURVE support, as its wheels have).

    Each secret key is SHA-256 of a label and the secret (curve25519 clamps any 32 bytes); the public keys follow.
    The daemon is the server pair and admits exactly the client public key; every client uses the client pair."""
    import zmq
    from zmq.utils import z85

    if not zmq.has("curve"):
        raise RuntimeError(
            f"this pyzmq/libzmq ({zmq.zmq_version()}) has no CurveZMQ support, which a daemon with a token or local "
            "auth requires: install pyzmq from its wheels (pip install --force-reinstall pyzmq)"
        )
    raw = secret.encode("utf-8", "surrogatepass")
    pairs = []
    for label in _KEY_LABELS:
        private = z85.encode(hashlib.sha256(label + raw).digest())
        pairs.append((zmq.curve_public(private), private))
    (server_public, server_secret), (client_public, client_secret) = pairs
    return CurveKeys(server_public, server_secret, client_public, client_secret)


def describe_handshake_failure(event: int) -> str | None:
    """What a client socket's monitor event (``sock.get_monitor_socket()``) means for the user, or None when it
    is not a handshake failure: a secured daemon drops a peer without the right secret, so without this a wrong or
    missing secret is only a timeout."""
    import zmq

    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (
            "the daemon and this client disagree on security: the daemon has a token (CurveZMQ) or local auth "
            "(its local secret) and this client has no secret or the other kind (pass --token / SDLIVE_TOKEN for a "
            f"token daemon; for a local one run as the daemon's user, with the same {LOCAL_SECRET_ENV} if it has "
            "one), or the daemon runs with --no-local-auth and this client has a token"
        )
    if event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_AUTH):
        return (
            f"the daemon refused this client's secret: its token (or local secret, {local_secret_path()}) differs "
            "from this client's (a daemon of another user, or one started with another SDLIVE_SECRET_FILE)"
        )
    return None


def secure_client_socket(sock: Any, secret: str, mechanism: Mechanism = "curve") -> None:
    """Make ``sock`` (a pyzmq socket, before ``connect``) a client of a daemon holding ``secret``: CurveZMQ keys
    derived from a token (``"curve"``) or ZMTP PLAIN with the local secret (``"plain"``); ``"none"`` leaves it."""
    if mechanism == "plain":
        sock.plain_username = PLAIN_USERNAME.encode()
        sock.plain_password = secret.encode("utf-8")
        return
    if mechanism == "none":
        return
    keys = curve_keys(secret)
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret


def secure_client(sock: Any, token: str | None = None, *, loopback: bool = True) -> Mechanism:
    """:func:`client_security` then :func:`secure_client_socket` on ``sock`` (before ``connect``): the one call a
    raw pyzmq client (a bench script, a test) makes per socket; returns the mechanism used."""
    mechanism, secret = client_security(token, loopback)
    if secret is not None:
        secure_client_socket(sock, secret, mechanism)
    return mechanism
