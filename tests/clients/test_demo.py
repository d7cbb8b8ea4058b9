"""`sdlive demo` end to end, offline, as a user runs it: it starts its own daemon (tiny model), streams a generated
clip switching presets mid-stream, writes a playable side-by-side video, prints the stats table and stops the
daemon it started."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import numpy as np
import pytest

FRAMES, SIZE = 16, 128


@pytest.mark.slow
def test_demo_runs_offline_and_writes_a_playable_side_by_side_video(tmp_path, media):
    out = tmp_path / "demo.mp4"
    proc = subprocess.run(
        [sys.executable, "-c", "from sdlive.obs_bridge.cli import main; main()", "demo", "--frames", str(FRAMES),
         "--size", str(SIZE), "--output", str(out), "--model", "tiny", "--device", "cpu"],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    # the stats table
    assert "anime → van-gogh → cyberpunk" in text
    assert re.search(rf"{FRAMES} in, {FRAMES} written", text), text
    assert "tiny on cpu" in text
    # a playable side-by-side video: cv2 decodes every frame, input left, restyled right
    frames = media.read_frames(out)
    assert len(frames) == FRAMES
    assert frames[0].shape == (SIZE, 2 * SIZE, 3)
    left, right = frames[5][:, :SIZE].astype(int), frames[5][:, SIZE:].astype(int)
    assert np.abs(left - right).mean() > 10
    # the daemon it started is gone
    address = re.search(r"local daemon at tcp://127\.0\.0\.1:(\d+)", text)
    assert address, text
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(address.group(1))), timeout=1):
        pass


@pytest.mark.slow
def test_demo_with_its_own_clip_takes_a_size_and_rounds_it(daemon, tmp_path, media):
    clip = media.make_clip(tmp_path / "clip.mp4", frames=12, fps=12, width=160, height=90)
    out = tmp_path / "demo.mp4"
    proc = subprocess.run(
        [sys.executable, "-c", "from sdlive.obs_bridge.cli import main; main()", "demo", "--input", str(clip),
         "--height", "60", "--output", str(out), "--daemon", daemon.control_address, "--presets", "anime,watercolor"],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 0, text
    assert "106x60 is restyled at 96x48" in text, text  # --height alone keeps the aspect ratio, then rounds
    frames = media.read_frames(out)
    assert len(frames) == 12 and frames[0].shape == (60, 2 * 106, 3)
