"""Session lifetime on a real daemon: clients that die are noticed and their shared memory freed, a corrupt ring
closes only its own session, capacity is enforced, in-band preset requests are honoured, and the daemon
shuts down in order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from sdlive.daemon.protocol.ring import FrameRing, ring_path
from sdlive.daemon.protocol.secret import secure_client
from sdlive.obs_bridge.client import DaemonClient, DaemonError

SIZE = 64


@pytest.fixture(scope="module")
def fast_daemon(tmp_path_factory, launch_daemon):
    """A daemon with 2 sessions max and a fast heartbeat (liveness 3 × 0.5 s). (Tokens: test_auth.py.)"""
    proc = launch_daemon(tmp_path_factory.mktemp("fast"), "--max-sessions", "2", "--heartbeat-interval", "0.5")
    yield proc
    proc.stop()


def session_ids(client: DaemonClient) -> set[str]:
    return {s.session_id for s in client.status().sessions}


def feed(session, frames: int) -> int:
    got = 0
    for i in range(frames):
        deadline = time.monotonic() + 10
        while (session.pending_inputs or 0) > 1 and time.monotonic() < deadline:
            got += session.recv(timeout_s=0.01) is not None
        session.send(np.full((session.height, session.width, 3), (7 * i) % 256, np.uint8))
        got += session.recv(timeout_s=0.03) is not None
    return got


CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from sdlive.obs_bridge.client import DaemonClient
    client = DaemonClient(sys.argv[1])
    s = client.open_session(width=64, height=64, fps=15, preset="anime")
    print(json.dumps({"session_id": s.session_id, "rings": [s.info.input_ring, s.info.output_ring]}), flush=True)
    i = 0
    while True:
        s.send(np.full((64, 64, 3), i % 256, np.uint8)); i += 1
        s.recv(timeout_s=0.05)
    """
)


def test_sigkilled_client_leaves_no_shared_memory_after_heartbeat_timeout(fast_daemon, wait_for):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, fast_daemon.control_address], stdout=subprocess.PIPE, text=True
    )
    try:
        info = json.loads(child.stdout.readline())
        rings = [Path(ring_path(name)) for name in info["rings"]]
        assert all(p.exists() for p in rings)
        with fast_daemon.client() as client:  # mid-stream: the daemon has taken the child's frames
            assert wait_for(lambda: client.status(info["session_id"]).sessions[0].frames_in > 0, timeout_s=30)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        killed_at = time.monotonic()
        assert wait_for(lambda: not any(p.exists() for p in rings), timeout_s=10), "rings still in /dev/shm"
        # liveness 3 × 0.5 s, checked once a second: gone within a few seconds, not at once
        assert time.monotonic() - killed_at < 6
        with fast_daemon.client() as client:
            assert info["session_id"] not in session_ids(client)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert f"session {info['session_id']} closed: client silent" in fast_daemon.log()


def test_corrupt_ring_header_closes_that_session_only(fast_daemon, wait_for):
    with fast_daemon.client() as client:
        victim = client.open_session(width=SIZE, height=SIZE, fps=15, preset="anime")
        other = client.open_session(width=SIZE, height=SIZE, fps=15, preset="watercolor")
        try:
            feed(victim, 6)
            feed(other, 6)
            assert victim.info.input_ring is not None
            path = Path(ring_path(victim.info.input_ring))
            with open(path, "r+b") as fh:  # a stray writer scribbles over the header
                fh.write(b"GARBAGE!")
            assert wait_for(lambda: victim.session_id not in session_ids(client), timeout_s=8)
            assert not path.exists(), "the corrupt session's ring was not unlinked"
            assert other.session_id in session_ids(client)
            outputs = feed(other, 20)
            assert outputs > 0, "the healthy session stopped producing output"
            with pytest.raises(DaemonError) as err:
                victim.send(np.zeros((SIZE, SIZE, 3), np.uint8))
            assert err.value.code == "unknown_session"
        finally:
            victim.close()
            other.close()
    log = fast_daemon.log()
    assert "ring header is corrupt" in log and "bad magic" in log


def test_capacity_is_enforced_with_a_clear_error(fast_daemon):
    with fast_daemon.client() as client:
        a = client.open_session(width=SIZE, height=SIZE, fps=15)
        b = client.open_session(width=SIZE, height=SIZE, fps=15)
        try:
            with pytest.raises(DaemonError) as err:
                client.open_session(width=SIZE, height=SIZE, fps=15)
            assert err.value.code == "capacity"
            assert "max-sessions" in err.value.message
        finally:
            a.close()
            b.close()


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path, sdlive_command):
    result = subprocess.run(
        sdlive_command("serve", "--model", "tiny", "--device", "cpu", "--no-ui", "--control", "tcp://0.0.0.0:0"),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)},
    )
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "without a token" in message and "--token" in message


def test_unknown_model_is_a_fatal_error_reported_on_pub_and_in_the_log(tmp_path, sdlive_command):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        pub = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RECONNECT_IVL, 10)
    sub.setsockopt(zmq.SUBSCRIBE, b"daemon")
    secure_client(sub)  # local auth is on by default: this session's secret (tests/conftest.py)
    sub.connect(pub)  # before the daemon binds: ZeroMQ connects as soon as it does
    try:
        result = subprocess.run(
            sdlive_command("serve", "--model", "no-such-model", "--no-ui", "--control", "tcp://127.0.0.1:0",
                           "--pub", pub),
            capture_output=True, text=True, timeout=120, env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)},
        )
        assert result.returncode == 1
        assert "cannot load model 'no-such-model'" in result.stderr + result.stdout
        beats = []
        while sub.poll(1000):
            beats.append(json.loads(sub.recv_multipart()[1]))
        assert beats, "no daemon message reached the subscriber"
        assert beats[-1]["state"] == "dead" and "no-such-model" in beats[-1]["message"]
    finally:
        sub.close(linger=0)


def test_sigterm_closes_sessions_unlinks_rings_and_says_so_on_pub(fast_daemon, wait_for):
    """Last in this module: it stops the module's daemon."""
    proc = fast_daemon
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    secure_client(sub)  # local auth is on by default: this session's secret (tests/conftest.py)
    sub.connect(proc.pub_address)
    try:
        with proc.client() as client:
            session = client.open_session(width=SIZE, height=SIZE, fps=15)
            feed(session, 6)
            rings = [Path(ring_path(name)) for name in (session.info.input_ring, session.info.output_ring) if name]
            assert len(rings) == 2
            assert all(p.exists() for p in rings)
            assert wait_for(lambda: sub.poll(100) and sub.recv_multipart()[0] == b"daemon", timeout_s=10), (
                "no daemon beat: the subscription is not live"
            )
            proc.process.send_signal(signal.SIGTERM)
            assert proc.process.wait(60) == 0
            assert not any(p.exists() for p in rings)
            messages = []
            while sub.poll(500):
                topic, body = sub.recv_multipart()
                messages.append((topic.decode(), json.loads(body)))
            states = [m["state"] for t, m in messages if t == "daemon"]
            assert states[-1] == "stopping"
            closed = [m for t, m in messages if t == "event" and m["event"] == "session_closed"]
            assert any(m["session_id"] == session.session_id for m in closed)
            session.close()  # idempotent, and fine with the daemon gone
    finally:
        sub.close(linger=0)


def test_rings_left_by_a_sigkilled_daemon_are_swept_live_ones_kept(daemon_factory, monkeypatch, tmp_path):
    from sdlive.daemon.server.transports import sweep_stale_rings

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("SDLIVE_SHM_DIR", str(shm))  # a private ring folder: nothing else on the machine is touched
    dead = daemon_factory("--no-warmup", env={"SDLIVE_SHM_DIR": str(shm)})
    with dead.client() as client:
        session = client.open_session(width=SIZE, height=SIZE, fps=15)
        session._heartbeat.stop()
        stale = {session.info.input_ring, session.info.output_ring}
        dead.process.kill()  # SIGKILL: that daemon cannot unlink anything
        dead.process.wait(10)
        session._in_ring.close()
        session._out_ring.close()
    live = FrameRing.create("sdlive-livering-in", width=16, height=16, pixel_format="rgb24")  # this process: alive
    try:
        assert {p.name for p in shm.iterdir()} == stale | {"sdlive-livering-in"}
        removed = sweep_stale_rings(min_age_s=0.0)  # no age needed: their creator is dead, the live ring's is us
        assert set(removed) == stale
        assert {p.name for p in shm.iterdir()} == {"sdlive-livering-in"}
    finally:
        live.unlink()
        live.close()
