"""Who gets in, on a real daemon: with a token every socket is CurveZMQ, so off loopback a client without the token
(or with a wrong one) gets no reply on control and no message on PUB, while one holding it is served; the JSON
token is still checked on every op but hello. With local auth (the default) the per-user secret keeps another account
of this machine out (ZMTP PLAIN): simulated with another secret file, and as root with a child process that drops to
`nobody`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zmq

from sdlive.daemon.protocol import secret as secret_mod
from sdlive.daemon.protocol.secret import read_local_secret, secure_client_socket

TOKEN = "a-long-random-token-for-tests"
SILENCE_S = 1.0
"""How long a refused client waits to be sure nothing comes back (a served one is answered in milliseconds)."""


def host_address() -> str | None:
    """An address of this machine that is not loopback (`hostname -I`), or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    ipv4 = [a for a in out if "." in a and not a.startswith("127.")]
    return ipv4[0] if ipv4 else None


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Client:
    """A DEALER (or SUB) that is a CurveZMQ (or, ``mechanism="plain"``, PLAIN) client when given a secret."""

    def __init__(self, address: str, secret: str | None, kind: int = zmq.DEALER, mechanism: str = "curve") -> None:
        self.sock = zmq.Context.instance().socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        if secret is not None:
            secure_client_socket(self.sock, secret, mechanism)
        if kind == zmq.SUB:
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(address)

    def ask(self, request: dict, timeout_s: float = 30.0) -> dict | None:
        try:
            self.sock.send(json.dumps(request).encode(), zmq.NOBLOCK)
        except zmq.Again:  # no connection completed its handshake: nowhere to send
            time.sleep(timeout_s)
            return None
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return json.loads(self.sock.recv_multipart()[-1])

    def next_pub(self, timeout_s: float) -> list[bytes] | None:
        return self.sock.recv_multipart() if self.sock.poll(int(timeout_s * 1000)) else None

    def close(self) -> None:
        self.sock.close(linger=0)


def wait_served(proc, secret: str | None, timeout_s: float = 120.0, mechanism: str = "curve") -> None:
    deadline = time.monotonic() + timeout_s
    client = Client(proc.control_address, secret, mechanism=mechanism)
    try:
        while time.monotonic() < deadline:
            if not proc.alive:
                raise RuntimeError(f"daemon exited:\n{proc.log()}")
            if client.ask({"op": "hello"}, timeout_s=1.0) is not None:
                return
        raise RuntimeError(f"daemon did not answer:\n{proc.log()}")
    finally:
        client.close()


@pytest.fixture(scope="module")
def remote_daemon(tmp_path_factory, launch_daemon):
    host = host_address()
    if host is None:
        pytest.skip("this machine has no non-loopback address to bind (hostname -I)")
    proc = launch_daemon(
        tmp_path_factory.mktemp("remote"),
        token=TOKEN,
        control=f"tcp://{host}:{free_port(host)}",
        pub=f"tcp://{host}:{free_port(host)}",
        wait=False,
    )
    try:
        wait_served(proc, TOKEN)
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("secret", [None, "wrong-token"], ids=["no-curve", "wrong-token"])
def test_control_off_loopback_answers_nothing_without_the_token(remote_daemon, secret):
    client = Client(remote_daemon.control_address, secret)
    try:
        for op in ("hello", "status", "shutdown"):
            assert client.ask({"op": op, "token": TOKEN}, timeout_s=SILENCE_S) is None, op
    finally:
        client.close()
    assert remote_daemon.alive


def test_control_off_loopback_serves_the_token_holder_and_counts_refusals(remote_daemon):
    client = Client(remote_daemon.control_address, TOKEN)
    try:
        hello = client.ask({"op": "hello"})
        assert hello is not None and hello["ok"] and hello["curve"] is True and hello["auth_required"] is True
        # CurveZMQ admits the connection; the JSON token is still checked on every op but hello
        assert client.ask({"op": "status"})["error"]["code"] == "unauthorized"
        assert client.ask({"op": "status", "token": "wrong"})["error"]["code"] == "unauthorized"
        status = client.ask({"op": "status", "token": TOKEN})
        assert status["ok"] and status["model"] == "tiny"
    finally:
        client.close()


def test_the_zap_handler_counts_a_client_key_it_refused(remote_daemon):
    """A peer that knows the daemon's public key but not the secret gets past CurveZMQ's first box only to be
    refused by the ZAP handler; status counts it."""
    intruder = zmq.Context.instance().socket(zmq.DEALER)
    intruder.setsockopt(zmq.LINGER, 0)
    public, private = zmq.curve_keypair()
    intruder.curve_serverkey = secret_mod.curve_keys(TOKEN).server_public
    intruder.curve_publickey, intruder.curve_secretkey = public, private
    intruder.connect(remote_daemon.control_address)
    try:
        intruder.send(b'{"op": "hello"}', zmq.NOBLOCK)
        assert not intruder.poll(int(SILENCE_S * 1000))
    except zmq.Again:
        time.sleep(SILENCE_S)  # refused before a pipe existed: nothing to send on
    intruder.close(0)
    client = Client(remote_daemon.control_address, TOKEN)
    try:
        assert client.ask({"op": "status", "token": TOKEN})["requests"]["refused_handshakes"] >= 1
    finally:
        client.close()


@pytest.mark.parametrize("secret", [None, "wrong-token"], ids=["no-curve", "wrong-token"])
def test_pub_off_loopback_publishes_nothing_without_the_token(remote_daemon, secret):
    outsider, insider = (
        Client(remote_daemon.pub_address, secret, zmq.SUB),
        Client(remote_daemon.pub_address, TOKEN, zmq.SUB),
    )
    try:
        beat = insider.next_pub(timeout_s=10.0)  # the daemon beats every second: the token holder hears it
        assert beat is not None and beat[0] == b"daemon"
        assert outsider.next_pub(timeout_s=SILENCE_S) is None
    finally:
        outsider.close()
        insider.close()


# ------------------------------------------------------------------------------------------------- local users

NOBODY = 65534

INTRUDER = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    os.setgid(%(uid)d); os.setuid(%(uid)d)
    import zmq
    spec = importlib.util.spec_from_file_location("secret", sys.argv[1])  # stdlib-only: loads by path, like OBS
    secret = importlib.util.module_from_spec(spec); spec.loader.exec_module(secret)
    result = {"uid": os.getuid()}
    try:
        result["read"] = secret.read_local_secret()
    except OSError as exc:
        result["read_error"] = str(exc)
    for label, key in (("plain", None), ("guessed", "guess")):
        sock = zmq.Context.instance().socket(zmq.DEALER); sock.linger = 0
        if key:
            secret.secure_client_socket(sock, key, "plain")
        sock.connect(sys.argv[2]); wait_ms = int(float(sys.argv[3]) * 1000)
        try:
            sock.send(b'{"op": "shutdown"}', zmq.NOBLOCK)
            result[label] = sock.recv().decode() if sock.poll(wait_ms) else None
        except zmq.Again:
            result[label] = None  # no connection got through its handshake
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def local_daemon(tmp_path_factory, launch_daemon):
    runtime = tmp_path_factory.mktemp("runtime")
    os.chmod(runtime, 0o755)  # like a shared parent: only sdlive's own 0700 folder and 0600 file protect the secret
    for parent in (runtime.parent, runtime.parent.parent):
        os.chmod(parent, os.stat(parent).st_mode | 0o005)  # let `nobody` walk to it, as to /run/user/<uid>
    path = runtime / "sdlive" / "secret"
    env = {"XDG_RUNTIME_DIR": str(runtime), secret_mod.LOCAL_SECRET_ENV: str(path)}
    proc = launch_daemon(tmp_path_factory.mktemp("local"), "--local-auth", env=env, wait=False)
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline and proc.alive:
            time.sleep(0.1)
        wait_served(proc, read_local_secret(path), mechanism="plain")
        yield proc, path
    finally:
        proc.stop()


def test_local_auth_creates_a_private_secret_and_serves_its_owner(local_daemon):
    proc, path = local_daemon
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    owner = Client(proc.control_address, read_local_secret(path), mechanism="plain")
    plain = Client(proc.control_address, None)
    guesser = Client(proc.control_address, "not-the-secret", mechanism="plain")
    try:
        hello = owner.ask({"op": "hello"})
        assert hello["ok"] and hello["security"] == "plain" and hello["curve"] is False
        assert hello["auth_required"] is False
        assert owner.ask({"op": "status"})["ok"]  # no JSON token: the PLAIN password is the proof
        assert plain.ask({"op": "status"}, timeout_s=SILENCE_S) is None  # a client that did not read the secret
        assert guesser.ask({"op": "shutdown"}, timeout_s=SILENCE_S) is None
        assert owner.ask({"op": "status"})["requests"]["refused_handshakes"] >= 1
    finally:
        owner.close()
        plain.close()
        guesser.close()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="simulating a second user needs root")
@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs a system python `nobody` can run")
@pytest.mark.skipif(
    Path("/usr/bin/python3").exists()
    and subprocess.run(["/usr/bin/python3", "-c", "import zmq"], capture_output=True).returncode != 0,
    reason="the system python `nobody` runs needs pyzmq: apt install python3-zmq (.ci/run does)",
)
def test_another_local_user_can_neither_read_the_secret_nor_drive_the_daemon(local_daemon):
    proc, path = local_daemon
    script = INTRUDER % {"uid": NOBODY}
    env = {"XDG_RUNTIME_DIR": str(path.parent.parent), "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    python = shutil.which("python3", path="/usr/bin")
    result = subprocess.run(
        [python, "-c", script, secret_mod.__file__, proc.control_address, str(SILENCE_S)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["uid"] == NOBODY
    assert "read" not in seen and "Permission denied" in seen["read_error"]
    assert seen["plain"] is None and seen["guessed"] is None  # its shutdown never arrived
    assert proc.alive  # and it still serves its owner
    owner = Client(proc.control_address, read_local_secret(path), mechanism="plain")
    try:
        assert owner.ask({"op": "status"})["ok"]
    finally:
        owner.close()


def test_a_default_daemon_refuses_a_client_with_another_users_secret(daemon_factory, tmp_path):
    """Local auth is on by default: a client process whose secret file holds another secret (another account's, as
    far as the daemon can tell) is refused at the handshake with one clear error, and never reaches an op; the
    same client with the daemon's own secret file (this test session's) is served by itself."""
    proc = daemon_factory()  # no flags: the default config
    assert "--local-auth" not in proc.args
    other = tmp_path / "other-user" / "secret"
    secret_mod.ensure_local_secret(other)  # a different random secret, private as the real one would be
    probe = textwrap.dedent(
        """
        import sys
        from sdlive.obs_bridge.client import DaemonClient, DaemonError
        try:
            with DaemonClient(sys.argv[1], timeout_s=20) as client:
                print("served", client.hello().security, client.status().model)
        except DaemonError as exc:
            print("refused", exc.code, exc.message)
        """
    )
    env = {**os.environ, secret_mod.LOCAL_SECRET_ENV: str(other)}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", probe, proc.control_address], capture_output=True, text=True,
                         timeout=60, env=env).stdout  # fmt: skip
    assert out.startswith("refused unauthorized") and "refused this client's secret" in out, out
    assert time.monotonic() - started < 15  # named at the handshake, not after the 20 s timeout
    own = subprocess.run([sys.executable, "-c", probe, proc.control_address], capture_output=True, text=True,
                         timeout=60).stdout  # fmt: skip
    assert own.split() == ["served", "plain", "tiny"], own
    assert proc.alive
