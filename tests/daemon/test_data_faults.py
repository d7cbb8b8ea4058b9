"""What a client does to its own frame resources cannot kill, stall or bloat a real daemon process (issue 13's data
plane): a truncated, deleted or scribbled ring closes that session only, with an event naming the fault; a ring
folder too small for a session is a clear open_session error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from sdlive.daemon.protocol.messages import Event, decode_pub
from sdlive.daemon.protocol.ring import ring_path
from sdlive.daemon.protocol.secret import secure_client
from sdlive.obs_bridge.client import DaemonError

SIZE = 64

VICTIM = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from sdlive.daemon.protocol.ring import FrameRing, RingError
    from sdlive.obs_bridge.client import DaemonClient
    client = DaemonClient(sys.argv[1])
    s = client.open_session(width=64, height=64, fps=15, transport="shm")  # its heartbeat thread keeps it alive
    # The frames go through rings of our own, opened safe=True: the fault the test makes must not kill this process
    # (its session would then end by heartbeat timeout, and the test would prove nothing about the ring checks).
    rin = FrameRing.open(s.info.input_ring, safe=True)
    print(json.dumps({"session_id": s.session_id, "rings": [s.info.input_ring, s.info.output_ring]}), flush=True)
    i = 0
    while True:
        try:
            rin.write(np.full((64, 64, 3), i % 256, np.uint8))
        except (RingError, OSError):
            pass
        i += 1
        time.sleep(1 / 15)
    """
)


class Events:
    """Every ``event`` on the daemon's PUB, from now on."""

    def __init__(self, pub_address: str) -> None:
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"event")
        secure_client(self.sub)  # local auth is on by default: this session's secret (tests/conftest.py)
        self.sub.connect(pub_address)
        self.seen: list[Event] = []

    def wait(self, session_id: str, event: str, timeout_s: float) -> list[Event]:
        """The session's events up to its first ``event`` (raises if it does not come within ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sub.poll(100):
                _topic, message = decode_pub(self.sub.recv_multipart())
                assert isinstance(message, Event)
                self.seen.append(message)
                if message.session_id == session_id and message.event == event:
                    return [e for e in self.seen if e.session_id == session_id]
        raise AssertionError(f"no {event!r} event for {session_id} in {timeout_s:g} s; seen: {self.seen}")

    def drain(self, quiet_s: float = 0.5) -> None:
        """Read what was published until nothing came for ``quiet_s``."""
        while self.sub.poll(int(quiet_s * 1000)):
            _topic, message = decode_pub(self.sub.recv_multipart())
            assert isinstance(message, Event)
            self.seen.append(message)

    def close(self) -> None:
        self.sub.close(linger=0)


def feed(session, frames: int) -> int:
    got = 0
    for i in range(frames):
        deadline = time.monotonic() + 10
        while (session.pending_inputs or 0) > 1 and time.monotonic() < deadline:
            got += session.recv(timeout_s=0.01) is not None
        session.send(np.full((session.height, session.width, 3), (7 * i) % 256, np.uint8))
        got += session.recv(timeout_s=0.03) is not None
    return got


def _truncate(path: Path) -> None:
    os.truncate(path, 0)


def _delete(path: Path) -> None:
    path.unlink()


def _scribble(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, np.uint8).tobytes())


FAULTS = {
    # (which ring, what is done to it, words the closing event must contain)
    "truncate-input": (0, _truncate, "was truncated to 0 bytes"),
    "truncate-output": (1, _truncate, "was truncated to 0 bytes"),
    "delete-input": (0, _delete, "was deleted from"),
    "scribble-input": (0, _scribble, "is corrupt"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_ring_fault_closes_that_session_only(daemon, fault):
    which, do, words = FAULTS[fault]
    events = Events(daemon.pub_address)
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, daemon.control_address], stdout=subprocess.PIPE, text=True)
    try:
        with daemon.client() as client:
            other = client.open_session(width=SIZE, height=SIZE, fps=15, transport="shm")
            try:
                info = json.loads(victim.stdout.readline())
                sid = info["session_id"]
                assert feed(other, 6) >= 0
                path = Path(ring_path(info["rings"][which]))
                do(path)
                closing = events.wait(sid, "session_closed", timeout_s=15)
                assert any(words in (e.message or "") for e in closing), [e.message for e in closing]
                assert daemon.alive, "the daemon died of a client's ring fault:\n" + daemon.log()[-3000:]
                assert victim.poll() is None, "the victim process died: the session may have ended by timeout"
                assert sid not in {s.session_id for s in client.status().sessions}
                assert not any(Path(ring_path(n)).exists() for n in info["rings"]), "the daemon left its ring files"
                assert feed(other, 20) > 0, "the healthy session stopped producing output"
                assert other.session_id in {s.session_id for s in client.status().sessions}
            finally:
                other.close()
    finally:
        victim.kill()
        victim.wait(10)
        events.close()


@pytest.fixture
def small_shm(tmp_path):
    """An 8 MiB tmpfs for the daemon's rings, like Docker's small /dev/shm (root only: it mounts one)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    folder = tmp_path / "shm"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_ring_folder_too_small_fails_open_session_with_the_fix_and_the_daemon_serves_on(
    daemon_factory, small_shm, monkeypatch
):
    monkeypatch.setenv("SDLIVE_SHM_DIR", str(small_shm))  # the daemon and this client look for rings there
    proc = daemon_factory()
    with proc.client() as client:
        with pytest.raises(DaemonError) as err:  # two 1280x720 bgra rings of 4 slots: 28 MiB > 8 MiB
            client.open_session(width=1280, height=720, fps=30, pixel_format="bgra", transport="shm")
        assert err.value.code == "capacity", err.value
        assert str(small_shm) in err.value.message and "--shm-size" in err.value.message
        assert os.listdir(small_shm) == [], "a refused session must leave no ring file"
        with client.open_session(width=SIZE, height=SIZE, fps=15, transport="shm") as small:
            assert feed(small, 12) > 0, "a session that fits must stream"
    assert proc.alive


# --------------------------------------------------------------------------------- bounded queues, checked frames


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def raw_push(address: str) -> zmq.Socket:
    """A client's frame socket that never drops: blocking sends, a deep queue (a flood, as an attacker sends it)."""
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100000)
    secure_client(sock)  # local auth is on by default: this session's secret (tests/conftest.py)
    sock.connect(address)
    return sock


def rtt_ms(client) -> float:
    started = time.perf_counter()
    client.hello()
    return (time.perf_counter() - started) * 1e3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the daemon's memory")
def test_a_network_flood_stays_bounded_counts_its_drops_and_control_answers(daemon):
    """3000 raw 256x256 frames (590 MB) sent as fast as ZeroMQ takes them, far faster than the tiny model on this
    CPU: the daemon's memory stays flat, every frame is either taken by the engine, dropped (counted: by the
    network link, newest wins, or by the deadline scheduler once staged and too late) or among the few waiting, and
    hello answers throughout."""
    from sdlive.daemon.protocol.netframe import encode_frame

    size, count = 256, 3000
    with daemon.client() as client:
        session = client.open_session(width=size, height=size, fps=30, transport="net")
        try:
            push = raw_push(session.input_address)
            head_proto = encode_frame(np.zeros((size, size, 3), np.uint8), seq=1, timestamp_ns=1, pixel_format="bgr24")
            pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)
            before = rss_mb(daemon.process.pid)
            rtts = []
            for i in range(count):
                head, payload = encode_frame(pixels, seq=i + 1, timestamp_ns=time.monotonic_ns(), pixel_format="bgr24")
                push.send_multipart([head, payload], copy=False)
                if i % 300 == 0:
                    rtts.append(rtt_ms(client))
            assert len(head_proto[0]) == 40
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # every frame reached the daemon: taken, dropped or waiting
                stats = session.status()
                unaccounted = count - stats.frames_in - stats.dropped_in - stats.dropped_late
                if 0 <= unaccounted <= 4:
                    break
                time.sleep(0.2)
            after = rss_mb(daemon.process.pid)
            assert 0 <= unaccounted <= 4, (
                f"{count} sent, {stats.frames_in} taken, {stats.dropped_in} dropped by the link, "
                f"{stats.dropped_late} dropped late"
            )
            assert stats.dropped_in > count // 2, "the flood must be dropped (newest wins), not queued"
            assert after - before < 150, f"the daemon grew from {before:.0f} to {after:.0f} MB under the flood"
            assert max(rtts) < 2000, f"control stalled during the flood: hello round trips {rtts} ms"
            push.close(linger=0)
        finally:
            session.close()


def _lying_jpeg(width: int, height: int) -> bytes:
    import cv2

    ok, data = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    data = bytearray(data.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_tiny_jpegs_declaring_a_huge_image_are_refused_fast_and_control_stays_responsive(daemon):
    """The attack of issue 13: a 600-byte JPEG whose own header says 30000x30000 in a 64x64 session's frame. It is
    refused from its header (never decoded), reported as an error event, and hello answers at once meanwhile."""
    from sdlive.daemon.protocol.netframe import NetFrameHeader

    payload = _lying_jpeg(30000, 30000)
    header = NetFrameHeader(1, 0, SIZE, SIZE, "bgr24", "jpeg", len(payload)).pack()
    events = Events(daemon.pub_address)
    with daemon.client() as client:
        session = client.open_session(width=SIZE, height=SIZE, fps=15, transport="net")
        try:
            quiet = [rtt_ms(client) for _ in range(5)]
            push = raw_push(session.input_address)
            started = time.perf_counter()
            rtts = []
            for i in range(500):
                push.send_multipart([header, payload])
                if i % 50 == 0:
                    rtts.append(rtt_ms(client))
            closing = events.wait(session.session_id, "error", timeout_s=15)
            assert any("jpeg image is 30000x30000" in (e.message or "") for e in closing), closing
            assert time.perf_counter() - started < 20
            assert max(rtts) < max(500.0, 20 * max(quiet)), f"control round trips during the attack: {rtts} ms"
            assert wait_until_bad(session, 500)
            assert session.status().bad_frames == 500, "every refused frame is counted"
            events.drain()
            reports = [e for e in events.seen if e.session_id == session.session_id and e.event == "error"]
            flood_s = time.perf_counter() - started
            assert len(reports) <= flood_s / 0.1 + 2, f"{len(reports)} reports in {flood_s:.1f} s: not rate-limited"
            assert daemon.alive
            push.close(linger=0)
        finally:
            session.close()
            events.close()


def wait_until_bad(session, count: int, timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if session.status().bad_frames >= count:
            return True
        time.sleep(0.2)
    return False


def test_a_source_faster_than_its_declared_fps_has_its_extra_outputs_dropped_and_counted(daemon):
    """Declared 2 fps, fed as fast as the model goes: outputs can leave only every 250 ms, so the rest are dropped
    from the output queue (newest wins) and counted as dropped_out, not piled up."""
    with daemon.client() as client:
        with client.open_session(width=SIZE, height=SIZE, fps=2, transport="shm") as session:
            deadline = time.monotonic() + 60
            stats = session.status()
            i = 0
            while time.monotonic() < deadline and stats.dropped_out < 10:
                if (session.pending_inputs or 0) < 2:
                    session.send(np.full((SIZE, SIZE, 3), (9 * i) % 256, np.uint8))
                    i += 1
                while session.recv(timeout_s=0.005) is not None:
                    pass
                if i % 10 == 0:
                    stats = session.status()
            assert stats.dropped_out >= 10, stats
            # Every output the engine made has left, been dropped, or waits (at most a lane's worth).
            waiting = stats.engine_frames_out - stats.frames_out - stats.dropped_out
            assert 0 <= waiting <= 32, stats


def test_a_session_larger_than_the_frame_memory_is_refused_at_open(daemon_factory):
    proc = daemon_factory("--frame-memory-mb", "64")
    with proc.client() as client:
        with pytest.raises(DaemonError) as err:  # 1920x1080 bgra over the network: ~ 500 MiB at worst
            client.open_session(width=1920, height=1080, fps=30, pixel_format="bgra", transport="net")
        assert err.value.code == "capacity"
        assert "MiB of frames" in err.value.message and "--frame-memory-mb" in err.value.message
        # 40 frames at worst for shm (2 rings of 4 slots, 32 waiting outputs): 640x352 bgra is ~ 34 MiB
        first = client.open_session(width=640, height=352, fps=30, pixel_format="bgra", transport="shm")
        try:
            with pytest.raises(DaemonError) as err:  # 640x480 bgra: ~ 47 MiB more, over the 64
                client.open_session(width=640, height=480, fps=30, pixel_format="bgra", transport="shm")
            assert err.value.code == "capacity" and "1 open session(s)" in err.value.message
            with client.open_session(width=SIZE, height=SIZE, fps=15, transport="shm") as small:
                assert feed(small, 8) >= 0
        finally:
            first.close()
    assert proc.alive


# ------------------------------------------------------------------------------- frame sockets off loopback


def _host_address() -> str | None:
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    ipv4 = [a for a in out if "." in a and not a.startswith("127.")]
    return ipv4[0] if ipv4 else None


def test_network_frames_off_loopback_reach_and_leave_only_the_token_holder(daemon_factory):
    """A network session of a daemon bound off loopback with a token: intruders without the token (plain, or
    CurveZMQ with a wrong token's keys) can push frames at its input port and pull at its output port, and the
    daemon takes none of theirs and sends them none, while the token holder streams."""
    import socket as socketlib

    from sdlive.daemon.protocol.netframe import encode_frame
    from sdlive.daemon.protocol.secret import secure_client_socket
    from sdlive.obs_bridge.client import DaemonClient

    host = _host_address()
    if host is None:
        pytest.skip("this machine has no non-loopback address to bind (hostname -I)")

    def port() -> int:
        with socketlib.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    token = "frame-socket-token-for-tests"
    proc = daemon_factory(token=token, control=f"tcp://{host}:{port()}", pub=f"tcp://{host}:{port()}", wait=False)
    deadline = time.monotonic() + 120
    with DaemonClient(proc.control_address, token=token, timeout_s=30) as client:
        while True:  # served (the handshake works) and the model loaded
            try:
                if getattr(client.status(), "state", "ready") == "ready":
                    break
            except DaemonError:
                pass
            assert time.monotonic() < deadline and proc.alive, proc.log()[-2000:]
            time.sleep(0.5)
        session = client.open_session(width=SIZE, height=SIZE, fps=15, transport="net")
        ctx = zmq.Context.instance()
        intruders = []
        for secret in (None, "a-wrong-token"):
            push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
            for sock in (push, pull):
                sock.setsockopt(zmq.LINGER, 0)
                if secret is not None:
                    secure_client_socket(sock, secret)
            push.connect(session.input_address)
            pull.connect(session.output_address)
            intruders.append((push, pull))
        try:
            frame = np.full((SIZE, SIZE, 3), 99, np.uint8)
            got = []
            for i in range(30):
                for push, _ in intruders:
                    try:  # a PUSH whose handshake never completes has nowhere to send: Again is the refusal too
                        push.send_multipart(list(encode_frame(frame, seq=i + 1, timestamp_ns=777_000 + i,
                                                              pixel_format="bgr24")), zmq.NOBLOCK)  # fmt: skip
                    except zmq.Again:
                        pass
                session.send(np.full((SIZE, SIZE, 3), (7 * i) % 256, np.uint8), timestamp_ns=1000 + i)
                if (out := session.recv(timeout_s=0.1)) is not None:
                    got.append(out)
            while (out := session.recv(timeout_s=2.0)) is not None:
                got.append(out)
            stats = session.status()
            assert got, "the token holder got no output"
            assert all(f.timestamp_ns < 777_000 for f in got), "an intruder's frame was delivered"
            assert stats.frames_in + stats.dropped_in <= 30 and stats.bad_frames == 0, stats
            for _, pull in intruders:
                assert not pull.poll(500), "an intruder received an output frame"
        finally:
            for push, pull in intruders:
                push.close(linger=0)
                pull.close(linger=0)
            session.close()
    assert proc.alive
