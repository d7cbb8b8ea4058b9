"""`sdlive serve --gpus N` as a user runs it: a real daemon process that spawns its ranks (gloo on the CPU), serves a
client over shared memory with the frames a one-device daemon gives for the same input, says how it spans its
devices in ``hello`` and ``status``, and ends loudly (the dead beat naming the rank, exit 1) when a rank dies;
``--mode shard`` places whole sessions on the devices."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from sdlive.daemon.protocol.secret import secure_client

pytestmark = pytest.mark.slow

SIZE = 64
FRAMES = 24
PARAMS = {"prompt": "a fox in the snow", "steps": 2, "seed": 7}


def frame_for(i: int) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    base = ((x + 2 * y + 5 * i) % 256).astype(np.uint8)
    return np.ascontiguousarray(np.stack([base, np.roll(base, i, axis=1), 255 - base], axis=-1))


def offline_stream(proc, count: int = FRAMES) -> list[np.ndarray]:
    """``count`` frames through an offline session (every input in order, none dropped, the stream batch kept),
    the client never lapping the daemon; the outputs' pixels in order."""
    with proc.client(timeout_s=60.0) as client:
        with client.open_session(width=SIZE, height=SIZE, fps=10, transport="shm", pacing="offline",
                                 params=PARAMS) as session:  # fmt: skip
            got = []
            for i in range(count):
                while (session.pending_inputs or 0) >= 2:
                    if (out := session.recv(timeout_s=0.01)) is not None:
                        got.append(out)
                session.send(frame_for(i), timestamp_ns=1000 + i)
            deadline = time.monotonic() + 120
            while len(got) < count - session.latency_frames and time.monotonic() < deadline:
                if (out := session.recv(timeout_s=0.2)) is not None:
                    got.append(out)
            assert [f.timestamp_ns for f in got] == [1000 + i for i in range(len(got))]
            assert len(got) >= count - session.latency_frames, f"{len(got)} outputs for {count} inputs"
            return [f.pixels.copy() for f in got]


def rank_pids(daemon_pid: int) -> list[int]:
    """The daemon's rank processes (``python -m sdlive.daemon.distributed.launch --rank R``), by rank."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon_pid and b"sdlive.daemon.distributed.launch" in cmdline:
            found.append((int(cmdline[cmdline.index(b"--rank") + 1]), int(entry.name)))
    return [pid for _, pid in sorted(found)]


@pytest.fixture(scope="module")
def single_frames(tmp_path_factory, launch_daemon):
    proc = launch_daemon(tmp_path_factory.mktemp("single"))
    try:
        return offline_stream(proc)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, launch_daemon):
    """One `serve --gpus 2` daemon for the module (a start costs seconds); the last test kills one of its ranks."""
    proc = launch_daemon(tmp_path_factory.mktemp("two-ranks"), "--gpus", "2", "--rebalance", "off", timeout_s=180)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank processes in /proc")
def test_a_two_rank_daemon_serves_the_frames_of_a_one_device_daemon_and_says_how_it_spans(two_ranks, single_frames):
    proc = two_ranks
    assert len(rank_pids(proc.process.pid)) == 1, "serve --gpus 2 spawns one more rank"
    with proc.client() as client:
        hello = client.hello()
        assert hello.parallel is not None and hello.parallel.startswith("pipeline over 2 ranks (gloo on cpu)"), hello
        assert "0-1 on rank 0, 2-3 on rank 1" in client.status().parallel
    got = offline_stream(proc)
    assert len(got) == len(single_frames)
    worst = max(int(np.abs(g.astype(np.int16) - w.astype(np.int16)).max()) for g, w in zip(got, single_frames, strict=True))
    assert worst <= 1, f"a frame of the 2-rank daemon differs from the one-device daemon's by {worst} levels"
    assert "pipeline of 2 ranks ready" in proc.log()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank processes in /proc")
def test_a_rank_killed_under_a_live_daemon_ends_it_with_the_dead_beat_naming_the_rank(two_ranks):
    proc = two_ranks
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"daemon")
    secure_client(sub)
    sub.connect(proc.pub_address)
    try:
        with proc.client(timeout_s=30.0) as client:
            session = client.open_session(width=SIZE, height=SIZE, fps=15, params=PARAMS)
            for i in range(8):
                session.send(frame_for(i))
                session.recv(timeout_s=0.1)
            (victim,) = rank_pids(proc.process.pid)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            dead = None
            i = 8
            while dead is None and time.monotonic() - killed < 60:
                if proc.alive and (session.pending_inputs or 0) <= 1:
                    try:
                        session.send(frame_for(i))  # the stream goes on: the next forward meets the dead rank
                    except Exception:  # noqa: BLE001 - the ring may already be gone with the daemon
                        pass
                    i += 1
                if sub.poll(100):
                    _, body = sub.recv_multipart()
                    beat = json.loads(body)
                    if beat["state"] == "dead":
                        dead = beat
        assert dead is not None, f"no dead beat within 60 s of killing rank 1:\n{proc.log()}"
        assert "rank 1" in dead["message"] and f"pid {victim}" in dead["message"], dead["message"]
        assert proc.process.wait(30) == 1
        assert time.monotonic() - killed < 60
    finally:
        sub.close(0)


def test_shard_mode_places_sessions_on_the_devices_and_each_streams(daemon_factory):
    proc = daemon_factory("--gpus", "2", "--mode", "shard", timeout_s=180)
    with proc.client(timeout_s=30.0) as client:
        assert client.hello().parallel.startswith("sessions sharded over 2 devices"), client.hello()
        sessions = [client.open_session(width=SIZE, height=SIZE, fps=15, params=PARAMS) for _ in range(3)]
        try:
            assert "2 session(s) on cpu, 1 session(s) on cpu" in client.status().parallel
            got = [0, 0, 0]
            deadline = time.monotonic() + 90
            i = 0
            while min(got) < 4 and time.monotonic() < deadline:
                for k, session in enumerate(sessions):
                    if (session.pending_inputs or 0) <= 1:
                        session.send(frame_for(i))
                    if session.recv(timeout_s=0.02) is not None:
                        got[k] += 1
                i += 1
            assert min(got) >= 4, f"outputs per session: {got}"
        finally:
            for session in sessions:
                session.close()
    assert proc.stop() == 0
