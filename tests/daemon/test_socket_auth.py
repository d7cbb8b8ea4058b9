"""Socket security with real ZeroMQ sockets: a SocketAuth server admits exactly the clients holding its secret
(CurveZMQ keys derived from it, checked by the ZAP thread); a wrong secret or a plain socket gets nothing through,
either way. And the local secret file: created private, kept across restarts, refused when others can read it."""

from __future__ import annotations

import os
import stat

import pytest
import zmq

from sdlive.daemon.protocol.secret import (
    LocalSecretError,
    curve_keys,
    ensure_local_secret,
    read_local_secret,
    secure_client_socket,
)
from sdlive.daemon.server.auth import SocketAuth


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


def _pair(ctx, auth: SocketAuth, client_secret: str | None, mechanism: str = "curve"):
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    auth.secure(server)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    if client_secret is not None:
        secure_client_socket(client, client_secret, mechanism)
    client.connect(f"tcp://127.0.0.1:{port}")
    return server, client


@pytest.mark.parametrize(("client_secret", "delivered"), [("s3cret", True), ("wrong", False), (None, False)])
def test_only_a_client_with_the_secret_gets_through(ctx, client_secret, delivered):
    auth = SocketAuth(ctx, "s3cret")
    server, client = _pair(ctx, auth, client_secret)
    try:
        client.send(b"ping")
        got = server.poll(1500)
        assert bool(got) is delivered
        if delivered:
            identity, payload = server.recv_multipart()
            assert payload == b"ping"
            server.send_multipart([identity, b"pong"])
            assert client.poll(1500) and client.recv() == b"pong"
    finally:
        server.close(0)
        client.close(0)
        auth.stop()


@pytest.mark.parametrize(
    ("client_secret", "mechanism", "delivered"),
    [("s3cret", "plain", True), ("wrong", "plain", False), (None, "none", False), ("s3cret", "curve", False)],
)
def test_local_auth_plain_admits_only_the_local_secret_and_counts_refusals(ctx, client_secret, mechanism, delivered):
    """Local auth: a PLAIN server whose ZAP handler admits the local secret as password, nothing else (a wrong
    password, a NULL client, a CURVE client with the right secret as token)."""
    auth = SocketAuth(ctx, "s3cret", "plain")
    assert auth.mechanism == "plain" and auth.enabled
    server, client = _pair(ctx, auth, client_secret, mechanism)
    try:
        client.send(b"ping")
        assert bool(server.poll(1500)) is delivered
        if delivered:
            assert server.recv_multipart()[1] == b"ping"
            assert auth.refused == 0
        elif mechanism == "plain":
            assert auth.refused == 1  # the ZAP handler saw it and said no
    finally:
        server.close(0)
        client.close(0)
        auth.stop()


def test_the_zap_handler_refuses_a_client_key_the_secret_does_not_derive(ctx):
    """A peer that learnt the server's public key (it is not secret in CurveZMQ's model) but not the secret."""
    auth = SocketAuth(ctx, "s3cret")
    server, client = _pair(ctx, auth, None)
    client.close(0)
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    public, private = zmq.curve_keypair()
    client.curve_serverkey, client.curve_publickey, client.curve_secretkey = (
        curve_keys("s3cret").server_public,
        public,
        private,
    )
    client.connect(server.getsockopt_string(zmq.LAST_ENDPOINT))
    try:
        client.send(b"ping")
        assert not server.poll(1500)
        assert auth.refused >= 1
    finally:
        server.close(0)
        client.close(0)
        auth.stop()


def test_without_a_secret_sockets_stay_plain(ctx):
    auth = SocketAuth(ctx, None)
    assert not auth.enabled
    server, client = _pair(ctx, auth, None)
    try:
        client.send(b"ping")
        assert server.poll(1500)
    finally:
        server.close(0)
        client.close(0)
        auth.stop()


def test_keys_are_derived_deterministically_and_differ_per_secret():
    a, b, c = curve_keys("one"), curve_keys("one"), curve_keys("two")
    assert a == b and a != c
    assert len(a.server_public) == len(a.client_secret) == 40 and a.server_public != a.client_public
    assert curve_keys("\udcff") != a  # any str (even an undecodable argv byte) derives keys, never raises


def test_the_local_secret_is_created_private_and_kept(tmp_path):
    path = tmp_path / "run" / "sdlive" / "secret"
    assert read_local_secret(path) is None
    first = ensure_local_secret(path)
    assert len(first) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ensure_local_secret(path) == first == read_local_secret(path)  # a restarted daemon keeps it
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temp file left


def test_a_local_secret_others_can_read_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "sdlive" / "secret"
    ensure_local_secret(path)
    os.chmod(path, 0o644)
    with pytest.raises(LocalSecretError, match="chmod 600"):
        read_local_secret(path)
    os.chmod(path, 0o600)
    os.chmod(path.parent, 0o755)
    with pytest.raises(LocalSecretError, match="chmod 700"):
        ensure_local_secret(path)


def test_secret_py_imports_only_the_stdlib_at_module_level():
    """The OBS script loads secret.py by path in OBS's own Python: pyzmq only inside the functions that need it."""
    import ast
    import sys

    from sdlive.daemon.protocol import secret

    tree = ast.parse(open(secret.__file__, encoding="utf-8").read())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, "a relative import: secret.py is loaded alone, by path"
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
