"""Sinks: the virtual camera through pyvirtualcam (every backend tried, a clear per-OS fix when none works), video
files that keep fps, size and audio, the preview window, and exact boundary checks."""

from __future__ import annotations

import fractions

import numpy as np
import pytest

from sdlive.obs_bridge.media.sinks import (
    NullSink,
    SinkError,
    VideoFileSink,
    VirtualCameraSink,
    VirtualCameraUnavailable,
    WindowSink,
    open_sink,
    virtual_camera_fix,
)


def _frames(n, w, h):
    return [np.full((h, w, 3), (i * 17) % 256, np.uint8) for i in range(n)]


def test_virtual_camera_sends_bgr_frames_to_a_registered_backend(recording_cam):
    with open_sink("vcam:recording", width=32, height=24, fps=30) as cam:
        assert isinstance(cam, VirtualCameraSink)
        assert (cam.backend, cam.device) == ("recording", "recording-cam")
        for f in _frames(3, 32, 24):
            cam.write(f)
        assert cam.frames_sent == 3
    rec = recording_cam.instances[-1]
    assert rec.closed and len(rec.frames) == 3
    assert rec.frames[1].size == 32 * 24 * 3 and rec.frames[1][0] == 17


def test_virtual_camera_without_a_backend_name_tries_every_backend(recording_cam):
    # on this machine the built-in backend has no device, so the probe falls through to the registered one
    with open_sink("vcam", width=16, height=16, fps=15) as cam:
        assert cam.backend == "recording"


def test_no_virtual_camera_backend_names_the_fix_for_this_os():
    from pyvirtualcam.camera import BACKENDS

    if any(name not in ("v4l2loopback", "obs", "unitycapture") for name in BACKENDS):
        pytest.skip("a test backend is registered")
    import glob
    import platform

    if platform.system() == "Linux" and glob.glob("/dev/video*"):
        pytest.skip("this machine has video devices: v4l2loopback may work")
    with pytest.raises(VirtualCameraUnavailable) as err:
        open_sink("vcam", width=64, height=48, fps=30)
    assert virtual_camera_fix() in str(err.value)
    with pytest.raises(VirtualCameraUnavailable, match="unknown virtual-camera backend 'nope'"):
        open_sink("vcam:nope", width=64, height=48, fps=30)


@pytest.mark.parametrize(
    ("system", "fix"),
    [("Linux", "sudo modprobe v4l2loopback devices=1 exclusive_caps=1"),
     ("Windows", "start its virtual camera once"),
     ("Darwin", "OBS camera extension")],
)
def test_virtual_camera_fix_names_each_os_remedy(system, fix):
    assert fix in virtual_camera_fix(system)


def test_sink_boundary_checks_have_exact_messages():
    with NullSink(width=8, height=4, fps=10) as sink:
        with pytest.raises(ValueError, match=r"unexpected frame dtype: float32 != uint8"):
            sink.write(np.zeros((4, 8, 3), np.float32))
        with pytest.raises(ValueError, match=r"unexpected frame shape: \(4, 8, 4\) != \(4, 8, 3\)"):
            sink.write(np.zeros((4, 8, 4), np.uint8))
        sink.write(np.zeros((4, 8, 3), np.uint8))
        assert sink.frames_sent == 1
    with pytest.raises(SinkError, match="after close"):
        sink.write(np.zeros((4, 8, 3), np.uint8))


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "h264"), (".webm", "vp9"), (".avi", "mpeg4"), (".mkv", "h264")])
def test_video_file_sink_keeps_frame_count_fps_and_size(tmp_path, media, suffix, codec):
    out = tmp_path / f"out{suffix}"
    with open_sink(f"file:{out}", width=64, height=48, fps=12) as sink:
        for f in _frames(10, 64, 48):
            sink.write(f)
    info = media.video_stream(media.probe(out))
    assert info["codec_name"] == codec
    assert (info["width"], info["height"], int(info["nb_read_frames"])) == (64, 48, 10)
    assert fractions.Fraction(info["r_frame_rate"]) == 12
    got = media.read_frames(out)
    assert abs(int(got[3].mean()) - 51) <= 3  # the pixels survive the encoder


def test_video_file_sink_keeps_ntsc_rates_exact(tmp_path, media):
    out = tmp_path / "ntsc.mp4"
    with VideoFileSink(out, width=32, height=32, fps=30000 / 1001) as sink:
        for f in _frames(5, 32, 32):
            sink.write(f)
    assert media.video_stream(media.probe(out))["r_frame_rate"] == "30000/1001"


def test_video_file_sink_copies_the_inputs_audio(tmp_path, media):
    src = media.make_clip(tmp_path / "with_audio.mp4", frames=24, fps=12, width=64, height=64, audio=True)
    for suffix, audio_codec in ((".mp4", "aac"), (".webm", "opus")):
        out = tmp_path / f"out{suffix}"
        with VideoFileSink(out, width=64, height=64, fps=12, audio_from=src) as sink:
            assert sink.has_audio
            for f in _frames(24, 64, 64):
                sink.write(f)
        streams = {s["codec_type"]: s for s in media.probe(out)["streams"]}
        assert streams["audio"]["codec_name"] == audio_codec
        assert float(streams["audio"]["duration"] if "duration" in streams["audio"] else 2.0) > 1.8  # all of it
        assert int(streams["video"]["nb_read_frames"]) == 24


def test_video_file_sink_without_audio_in_the_input_writes_video_only(tmp_path, media):
    src = media.make_clip(tmp_path / "silent.mp4", frames=4, fps=12, width=32, height=32)
    out = tmp_path / "out.mp4"
    with VideoFileSink(out, width=32, height=32, fps=12, audio_from=src) as sink:
        assert not sink.has_audio
        for f in _frames(4, 32, 32):
            sink.write(f)
    assert [s["codec_type"] for s in media.probe(out)["streams"]] == ["video"]


def test_odd_sizes_are_padded_for_the_encoder(tmp_path, media):
    out = tmp_path / "odd.mp4"
    with open_sink(str(out), width=33, height=17, fps=10) as sink:
        sink.write(np.zeros((17, 33, 3), np.uint8))
    info = media.video_stream(media.probe(out))
    assert (info["width"], info["height"]) == (34, 18)


def test_bad_outputs_raise_clear_errors(tmp_path):
    with pytest.raises(SinkError, match="unknown video extension '.xyz'"):
        open_sink(f"file:{tmp_path / 'a.xyz'}", width=8, height=8, fps=10)
    with pytest.raises(SinkError, match="folder .* does not exist"):
        open_sink(f"file:{tmp_path / 'no' / 'a.mp4'}", width=8, height=8, fps=10)
    with pytest.raises(SinkError, match="unknown output 'speakers'"):
        open_sink("speakers", width=8, height=8, fps=10)
    with pytest.raises(SinkError, match="file output needs a path"):
        open_sink("file:", width=8, height=8, fps=10)


def test_preview_window_without_a_display_names_the_fix(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(SinkError, match="cannot open a preview window .*--output vcam"):
        open_sink("window", width=8, height=8, fps=10)


def test_preview_window_shows_frames_on_a_display(xdisplay, monkeypatch):
    monkeypatch.setenv("DISPLAY", xdisplay)
    with open_sink("window", width=40, height=30, fps=10) as win:
        assert isinstance(win, WindowSink)
        for f in _frames(3, 40, 30):
            win.write(f)
        assert win.frames_sent == 3 and win.poll_keys() == []
    assert win.closed
