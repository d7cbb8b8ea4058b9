"""Fixtures for the client media tests (capture, sinks, cam/render/demo): generated clips with or without audio, a
recording pyvirtualcam backend, a virtual X display, and helpers to inspect video files.

(pytest runs with ``--import-mode=importlib``, so tests reach these helpers through fixtures, not imports.)"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest


def make_clip(path: Path, *, frames: int, fps: float, width: int, height: int, audio: bool = False) -> Path:
    """A generated clip: FFmpeg's moving test pattern, plus a 440 Hz tone when ``audio``. Frame-exact."""
    seconds = f"{frames / fps:.6f}"
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-t", seconds, "-i", f"testsrc2=size={width}x{height}:rate={fps}"]
    if audio:  # input-side -t on both: the tone lasts exactly as long as the video
        cmd += ["-f", "lavfi", "-t", seconds, "-i", "sine=frequency=440:sample_rate=44100"]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "1"]
    if audio:
        cmd += ["-c:a", "aac"]
    subprocess.run([*cmd, str(path)], check=True)
    return path


def probe(path: Path) -> dict:
    """ffprobe's view of a file: streams with codec, size, frame count (counted by decoding), rate."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_entries",
         "stream=codec_type,codec_name,width,height,nb_read_frames,r_frame_rate,avg_frame_rate,duration", "-of", "json",
         str(path)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def video_stream(info: dict) -> dict:
    return next(s for s in info["streams"] if s["codec_type"] == "video")


def read_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames


class RecordingBackend:
    """A pyvirtualcam backend that records what it is sent (registered with ``pyvirtualcam.register_backend``).

    Instances append to the class-level ``instances`` list so a test can look at the frames and their arrival
    times after the camera is gone."""

    instances: list[RecordingBackend] = []
    lock = threading.Lock()

    def __init__(self, *, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw) -> None:
        self.width, self.height, self.fps, self.fourcc = width, height, fps, fourcc
        self._device = device or "recording-cam"
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.closed = False
        with RecordingBackend.lock:
            RecordingBackend.instances.append(self)

    def send(self, frame: np.ndarray) -> None:
        self.frames.append(frame.copy())
        self.times.append(time.monotonic())

    def close(self) -> None:
        self.closed = True

    def device(self) -> str:
        return self._device

    def native_fourcc(self):
        return self.fourcc


class _Helpers:
    make_clip = staticmethod(make_clip)
    probe = staticmethod(probe)
    video_stream = staticmethod(video_stream)
    read_frames = staticmethod(read_frames)


@pytest.fixture
def media():
    """make_clip / probe / video_stream / read_frames."""
    return _Helpers


@pytest.fixture
def recording_cam():
    """Register the recording backend as pyvirtualcam backend "recording"; unregister it afterwards."""
    from pyvirtualcam.camera import BACKENDS, register_backend

    RecordingBackend.instances.clear()
    register_backend("recording", RecordingBackend)
    try:
        yield RecordingBackend
    finally:
        BACKENDS.pop("recording", None)
        RecordingBackend.instances.clear()


@pytest.fixture(scope="module")
def xdisplay():
    """A private Xvfb display (":N"), skipped when Xvfb is not installed."""
    import os
    import select
    import shutil

    if not shutil.which("Xvfb"):
        pytest.skip("Xvfb is not installed (apt install xvfb)")
    # -displayfd: Xvfb picks a free display and writes its number once it accepts connections (the socket file
    # appears earlier, and a client connecting in between is refused: seen on a loaded CI machine).
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "320x240x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(write_fd,))
    os.close(write_fd)
    number = b""
    deadline = time.monotonic() + 20
    with os.fdopen(read_fd, "rb", buffering=0) as ready:
        while not number.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ready], [], [], left)[0]:
                proc.kill()
                pytest.skip("Xvfb did not start within 20 s")
            chunk = ready.read(16)
            if not chunk:  # Xvfb exited
                proc.kill()
                pytest.skip("Xvfb did not start")
            number += chunk
    try:
        yield f":{int(number)}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="package")
def daemon(tmp_path_factory, launch_daemon):
    """The suite's real tiny-model daemon (tests/conftest.py's `start_daemon`), shared by every module of
    tests/clients instead of one per module: a start costs seconds, and each test here opens and closes its own
    sessions."""
    proc = launch_daemon(tmp_path_factory.mktemp("clients-daemon"))
    try:
        yield proc
    finally:
        proc.stop()
