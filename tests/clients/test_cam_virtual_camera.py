"""`sdlive cam` end to end: a real daemon (tiny model), the synthetic source, and a recording virtual-camera backend
registered through `pyvirtualcam.register_backend` in the cam process. The camera receives the daemon's frames at
the set fps; a preset key typed into the running cam switches the daemon session's preset (seen in `status`) and
the frames that follow change.

How "they change" is proven: the tiny model has random weights, so its frames are noisy and a prompt change does not
show as a style; but it is deterministic. The input is one still image, so the k-th output depends only on k and
the prompt (a daemon that falls behind under CPU load and skips inputs delays the sequence, it doesn't alter it).
The same stream run without the switch gives the reference: identical frames before the switch, different after."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from sdlive.daemon.protocol.messages import SessionStats
from sdlive.obs_bridge.client import DaemonClient
from sdlive.obs_bridge.media.capture import synthetic_frame

SCRIPT = Path(__file__).with_name("cam_recording_main.py")
SIZE = 128
FPS = 6.0


def _recorded(prefix: Path) -> int:
    try:
        return len(prefix.with_suffix(".log").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _cam_session(client: DaemonClient) -> SessionStats:
    sessions = client.status().sessions
    mine = [s for s in sessions if s.client == "sdlive-cam"]
    assert len(mine) == 1, sessions
    return mine[0]


def _reference_outputs(address: str, n: int, preset: str) -> list[np.ndarray]:
    """The same synthetic stream through the daemon with no preset switch, every frame in order."""
    outs: list[np.ndarray] = []
    still = synthetic_frame(0, SIZE, SIZE)
    with DaemonClient(address, timeout_s=30) as dc, dc.open_session(width=SIZE, height=SIZE, fps=FPS, preset=preset) as s:
        sent, deadline = 0, time.monotonic() + 120
        while len(outs) < n and time.monotonic() < deadline:
            if sent - len(outs) < s.latency_frames + 3:
                s.send(still)
                sent += 1
            f = s.recv(0.02)
            if f is not None:
                outs.append(f.pixels)
    assert len(outs) == n
    return outs


@pytest.mark.slow
def test_cam_streams_to_the_virtual_camera_at_the_set_fps_and_switches_presets_on_keys(daemon, tmp_path):
    prefix = tmp_path / "rec"
    stills = tmp_path / "stills"
    stills.mkdir()
    cv2.imwrite(str(stills / "still.png"), synthetic_frame(0, SIZE, SIZE))
    cmd = [sys.executable, str(SCRIPT), str(prefix), "cam", "--input", f"images:{stills}", "--width", str(SIZE),
           "--height", str(SIZE), "--fps", str(FPS), "--output", "vcam", "--preset", "anime",
           "--daemon", daemon.control_address, "--duration", "60"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with DaemonClient(daemon.control_address, timeout_s=30) as dc:
            names = [p.name for p in dc.list_presets().presets]
            target = names[2]  # key "3"
            assert target != "anime"
            deadline = time.monotonic() + 90
            while _recorded(prefix) < 10:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the virtual camera received no frames"
                time.sleep(0.1)
            assert _cam_session(dc).preset == "anime"
            switched_after = _recorded(prefix)
            proc.stdin.write("3\n")
            proc.stdin.flush()
            while _cam_session(dc).preset != target:
                assert time.monotonic() < deadline, "the key did not switch the daemon session's preset"
                time.sleep(0.05)
            while _recorded(prefix) < switched_after + 24:
                assert proc.poll() is None
                assert time.monotonic() < deadline, "frames stopped after the switch"
                time.sleep(0.1)
        proc.stdin.write("q\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "recording-cam (recording)" in out  # found by probing every backend
    rec = np.load(prefix.with_suffix(".npz"))
    frames, times = rec["frames"], rec["times"]
    assert frames.shape[1:] == (SIZE, SIZE, 3) and len(frames) >= switched_after + 24

    # rate: frames reach the camera on the cam's output clock at the source fps (bursts from the daemon are
    # smoothed); a daemon starved of CPU leaves gaps, so the clock is measured on the median interval
    intervals = np.diff(times[2:])
    rate = 1.0 / float(np.median(intervals))
    assert FPS * 0.85 <= rate <= FPS * 1.15, f"received at {rate:.2f} fps, set {FPS}: {np.round(intervals, 3)}"
    on_tick = np.mean(np.abs(intervals - 1.0 / FPS) < 0.2 / FPS)
    assert on_tick >= 0.5, f"only {on_tick:.0%} of the frames came on the {FPS} fps clock: {np.round(intervals, 3)}"

    # the frames: identical to a no-switch run until the switch, then different
    ref = _reference_outputs(daemon.control_address, len(frames), "anime")
    diffs = [float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) for a, b in zip(frames, ref, strict=True)]
    assert max(diffs[:5]) < 1.0, f"before the switch the cam's frames should match the reference: {diffs[:10]}"
    first_changed = next(i for i, d in enumerate(diffs) if d > 1.0)
    assert first_changed >= 5
    assert np.mean(diffs[-8:]) > 8.0, f"after the switch the frames should differ: {diffs[-8:]}"
