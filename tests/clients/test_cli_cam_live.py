"""`sdlive cam` against real daemons, as a streamer runs it: the daemon's own drop counts are reported (not 0), a
file output plays at real speed however many frames the daemon managed, and a daemon restart is survived: the
virtual camera holds its last frame while the daemon is gone and the cam reconnects to the new one."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from sdlive.daemon.protocol.messages import SessionStats, decode_pub
from sdlive.daemon.protocol.secret import secure_client
from sdlive.obs_bridge.client import DaemonClient, DaemonError

SCRIPT = Path(__file__).with_name("cam_recording_main.py")


def _recorded(prefix: Path) -> int:
    try:
        return len(prefix.with_suffix(".log").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _cam_sessions(address: str) -> list[str]:
    try:
        with DaemonClient(address, timeout_s=2.0) as dc:
            return [s.session_id for s in dc.status().sessions if s.client == "sdlive-cam"]
    except DaemonError:
        return []


@pytest.mark.slow
def test_cam_reports_the_daemons_drops_and_records_a_file_at_real_speed(daemon, tmp_path, sdlive_command, media):
    """A source far faster than the tiny model on this CPU: the daemon drops frames, the cam says how many (the
    daemon's own count, as its PUB stats show it), and the recorded file lasts as long as the recording did."""
    seen: list[SessionStats] = []
    halt = threading.Event()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"stats")
    secure_client(sub)  # local auth is on by default: this session's secret (tests/conftest.py)
    sub.connect(daemon.pub_address)

    def listen() -> None:
        while not halt.is_set():
            if sub.poll(100):
                _, stats = decode_pub(sub.recv_multipart())
                if isinstance(stats, SessionStats) and stats.client == "sdlive-cam":
                    seen.append(stats)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    out_file = tmp_path / "live.mp4"
    try:
        result = subprocess.run(
            sdlive_command("cam", "--input", "synthetic", "--width", "256", "--height", "256", "--fps", "90",
                           "--output", f"file:{out_file}", "--daemon", daemon.control_address, "--duration", "5",
                           "--no-keys"),
            capture_output=True, text=True, timeout=120)
    finally:
        halt.set()
        listener.join(5)
        sub.close(linger=0)
    log = " ".join(result.stderr.split())
    assert result.returncode == 0, result.stderr
    done = re.search(r"done: (\d+) frames out of (\d+) in ([\d.]+) s, dropped (\d+) here, daemon (\d+) in / (\d+) out",
                     log)
    assert done, result.stderr
    frames_out, elapsed = int(done[1]), float(done[3])
    daemon_in, daemon_out = int(done[5]), int(done[6])
    assert seen, "no stats for the cam's session on PUB"
    last = seen[-1]
    assert last.dropped_in + last.dropped_out > 0, "the daemon kept up with 90 fps: the test proves nothing"
    # the cam's figures are the daemon's (its final status is at least as new as the last PUB message)
    assert daemon_in >= last.dropped_in and daemon_out >= last.dropped_out and daemon_in + daemon_out > 0

    stream = media.video_stream(media.probe(out_file))
    duration = float(stream["duration"])
    frames_written = int(stream["nb_read_frames"])
    assert frames_written <= frames_out
    # placed by capture time: the file lasts about as long as the frames took to come (not frames / 90 fps)
    assert duration >= 0.6 * (elapsed - 2.0), (duration, elapsed, frames_written)
    assert duration > 1.5 * frames_written / 90.0, (duration, frames_written)


@pytest.mark.slow
def test_cam_holds_its_last_frame_through_a_daemon_restart_and_reconnects(daemon_factory, tmp_path):
    first = daemon_factory()
    prefix = tmp_path / "rec"
    cmd = [sys.executable, str(SCRIPT), str(prefix), "cam", "--input", "synthetic", "--width", "64", "--height", "64",
           "--fps", "10", "--output", "vcam", "--daemon", first.control_address, "--duration", "120"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while _recorded(prefix) < 10:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the virtual camera received no frames"
            time.sleep(0.1)
        first.process.send_signal(signal.SIGKILL)  # the daemon is gone without a word
        first.process.wait(10)
        at_kill = _recorded(prefix)
        while _recorded(prefix) < at_kill + 20:  # the camera goes on: the last frame, held
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the camera stopped when the daemon died"
            time.sleep(0.1)
        second = daemon_factory(control=first.control_address, pub=first.pub_address)
        deadline = time.monotonic() + 60
        while not _cam_sessions(second.control_address):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the cam did not reconnect to the restarted daemon"
            time.sleep(0.2)
        back = _recorded(prefix)
        while _recorded(prefix) < back + 15:
            assert time.monotonic() < deadline, "no frames after the reconnect"
            time.sleep(0.1)
        proc.stdin.write("q\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = " ".join(out.split())
    assert proc.returncode == 0, out
    assert "holding the last frame; reconnecting" in log and "reconnected: session" in log, out
    assert "1 reconnect" in log and "1 reconnects" not in log, out
    frames = np.load(prefix.with_suffix(".npz"))["frames"]
    same = [bool(np.array_equal(a, b)) for a, b in zip(frames[:-1], frames[1:], strict=True)]
    runs, run = [], 0
    for s in same:
        run = run + 1 if s else 0
        runs.append(run)
    held = max(runs)
    assert held >= 15, f"the held frame should repeat while the daemon was gone (longest repeat {held})"
    end_of_hold = runs.index(held)
    assert not all(same[end_of_hold + 1:]), "the frames after the reconnect should move again"


def test_a_finite_input_is_paced_at_its_fps_and_flushed_to_the_last_frame(daemon, sdlive_command):
    started = time.monotonic()
    result = subprocess.run(sdlive_command("cam", "--input", "synthetic:20", "--width", "64", "--height", "64",
                                           "--fps", "10", "--output", "none", "--daemon", daemon.control_address,
                                           "--no-keys"), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    log = " ".join(result.stderr.split())
    assert result.returncode == 0, result.stderr
    done = re.search(r"done: (\d+) frames out of (\d+) in ([\d.]+) s", log)
    assert done, result.stderr
    assert (int(done[1]), int(done[2])) == (20, 20), log  # every output back before it closed (padding dropped)
    assert float(done[3]) >= 1.9 and took >= 1.9, log  # 20 frames at 10 fps: two seconds, not a burst


def test_status_shows_a_loading_daemon_and_waits_for_it(daemon_factory, sdlive_command):
    proc = daemon_factory(wait=False)
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = subprocess.run(sdlive_command("status", "--address", proc.control_address, "--timeout", "1"),
                                capture_output=True, text=True, timeout=60)
        if result.returncode == 0:
            seen.append(" ".join(result.stdout.split()))
            if "loading tiny" in seen[-1]:
                break
    assert seen and "loading tiny:" in seen[-1], seen  # answered while loading, with its progress
    assert "sdlive status --wait" in seen[-1]
    waited = subprocess.run(sdlive_command("status", "--address", proc.control_address, "--wait", "--timeout", "30"),
                            capture_output=True, text=True, timeout=180)
    assert waited.returncode == 0, waited.stderr
    assert "no sessions open" in waited.stdout and "loading" not in waited.stdout
