"""`StyledCamera`, the pyvirtualcam-sized scripting API: frames sent go through a real daemon and the restyled ones
come out of the (recording) virtual camera; exact boundary messages; idempotent close; a live preset switch."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sdlive.obs_bridge import StyledCamera, open_source
from sdlive.obs_bridge.media.sinks import VirtualCameraUnavailable

SIZE, FPS = 128, 10.0


@pytest.mark.slow
def test_styled_camera_restyles_sent_frames_into_the_virtual_camera(daemon, recording_cam):
    with StyledCamera(width=SIZE, height=SIZE, fps=FPS, preset="anime", daemon=daemon.control_address,
                      output="vcam:recording") as cam:
        assert (cam.backend, cam.device, cam.preset) == ("recording", "recording-cam", "anime")
        with pytest.raises(ValueError, match=r"unexpected frame dtype: float64 != uint8"):
            cam.send(np.zeros((SIZE, SIZE, 3)))
        with pytest.raises(ValueError, match=r"unexpected frame shape: \(64, 64, 3\) != \(128, 128, 3\)"):
            cam.send(np.zeros((64, 64, 3), np.uint8))
        src = open_source("synthetic", width=SIZE, height=SIZE, fps=FPS)
        deadline = time.monotonic() + 60
        while cam.frames_received < 8:
            assert time.monotonic() < deadline, "no restyled frame reached the camera"
            cam.send(src.read().pixels)
            cam.sleep_until_next_frame()
        cam.set_preset("pixel-art")
        assert cam.preset == "pixel-art"
        assert cam.frames_sent >= 8 + cam.latency_frames
        session_id = cam.session_id
    cam.close()  # idempotent
    rec = recording_cam.instances[-1]
    assert rec.closed and len(rec.frames) == cam.frames_received
    src.close()
    # the camera got restyled frames, not the inputs
    first = rec.frames[0].reshape(SIZE, SIZE, 3).astype(int)
    with open_source("synthetic:1", width=SIZE, height=SIZE) as clip:
        assert np.abs(first - clip.read().pixels.astype(int)).mean() > 10
    with daemon.client() as dc:
        assert session_id not in {s.session_id for s in dc.status().sessions}


def test_styled_camera_without_a_backend_fails_before_touching_the_daemon():
    with pytest.raises(VirtualCameraUnavailable, match="unknown virtual-camera backend 'nope'"):
        StyledCamera(width=64, height=64, fps=30, output="vcam:nope", daemon="tcp://127.0.0.1:1")


def test_styled_camera_finds_the_daemon_as_every_sdlive_command_does(daemon, recording_cam, monkeypatch, tmp_path):
    """No ``daemon=``: SDLIVE_CONTROL (then the config file, then the default), the rule of `sdlive cam` and the rest."""
    from sdlive.obs_bridge.cli.connect import TargetError

    monkeypatch.setenv("SDLIVE_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text(f'control = "{daemon.control_address}"\n')
    monkeypatch.delenv("SDLIVE_CONTROL", raising=False)
    with StyledCamera(width=64, height=64, fps=FPS, output="vcam:recording") as cam:
        with daemon.client() as dc:
            assert cam.session_id in {s.session_id for s in dc.status().sessions}
    monkeypatch.setenv("SDLIVE_CONTROL", "localhost:7557")
    with pytest.raises(TargetError, match=r"localhost:7557.*\(from SDLIVE_CONTROL\)"):
        StyledCamera(width=64, height=64, fps=FPS, output="vcam:recording")
