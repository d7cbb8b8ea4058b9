"""Capture sources: every kind yields BGR frames of the asked size at the source's rate, and every failure is one
clear SourceError naming the fix."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sdlive.obs_bridge.media.capture import FrameSource, SourceError, open_source, synthetic_frame


def test_synthetic_source_yields_the_asked_count_size_and_moving_frames():
    with open_source("synthetic:6", width=96, height=64, fps=10) as src:
        assert isinstance(src, FrameSource)
        assert (src.size, src.fps, src.frame_count) == ((96, 64), 10.0, 6)
        frames = list(src)
    assert [f.index for f in frames] == list(range(6))
    assert all(f.pixels.shape == (64, 96, 3) and f.pixels.dtype == np.uint8 for f in frames)
    assert all(b.timestamp_ns > a.timestamp_ns for a, b in zip(frames, frames[1:], strict=False))
    # the shapes move: consecutive frames differ, and the clip is deterministic
    assert np.abs(frames[0].pixels.astype(int) - frames[5].pixels.astype(int)).mean() > 2
    assert np.array_equal(frames[3].pixels, synthetic_frame(3, 96, 64))


def test_video_file_source_keeps_count_fps_and_size_and_resizes_keeping_aspect(tmp_path, media):
    clip = media.make_clip(tmp_path / "clip.mp4", frames=12, fps=12, width=160, height=96)
    with open_source(str(clip)) as src:
        assert (src.size, src.fps, src.frame_count) == ((160, 96), 12.0, 12)
        assert len(list(src)) == 12
    with open_source(f"file:{clip}", width=80) as src:
        assert src.size == (80, 48)
        first = src.read()
        assert first.pixels.shape == (48, 80, 3)


def test_video_file_source_can_loop(tmp_path, media):
    clip = media.make_clip(tmp_path / "clip.mp4", frames=4, fps=12, width=64, height=64)
    with open_source(str(clip), loop=True) as src:
        assert src.frame_count is None
        frames = [src.read() for _ in range(10)]
    assert all(f is not None for f in frames)


def test_image_folder_source_reads_images_in_name_order(tmp_path):
    for i in (2, 0, 1):
        cv2.imwrite(str(tmp_path / f"img{i:02d}.png"), np.full((20, 30, 3), i * 50, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    with open_source(str(tmp_path), fps=5) as src:
        assert (src.size, src.fps, src.frame_count) == ((30, 20), 5.0, 3)
        values = [int(f.pixels[0, 0, 0]) for f in src]
    assert values == [0, 50, 100]


def test_screen_region_is_captured_from_an_x_display(xdisplay, monkeypatch):
    monkeypatch.setenv("DISPLAY", xdisplay)
    with open_source("screen:10,20,64,48") as src:
        assert src.size == (64, 48)
        frame = src.read()
        assert frame.pixels.shape == (48, 64, 3)
    with open_source("screen") as src:
        assert src.size == (320, 240)
    with pytest.raises(SourceError, match="no monitor 5"):
        open_source("screen:5")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("webcam:97", "cannot open webcam 97"),
        ("97", "cannot open webcam 97"),
        ("webcam:NoSuchCameraModel", "no webcam named 'NoSuchCameraModel'"),
        ("missing-file.mp4", "video file not found"),
        ("synthetic:0", "frame count must be positive"),
        ("synthetic:many", "bad synthetic spec"),
        ("screen:1,2,3", "bad screen region"),
        ("bogus:thing", "unknown input 'bogus:thing'"),
        ("attach:", "attach needs a session id"),
        ("", "empty input spec"),
    ],
)
def test_bad_specs_raise_one_clear_error(spec, message, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(SourceError, match=message):
        open_source(spec)


def test_unreadable_files_and_empty_folders_raise_clear_errors(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(SourceError, match="cannot decode video file .*junk.mp4"):
        open_source(str(junk))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no images in"):
        open_source(f"images:{empty}")


def test_screen_without_a_display_names_the_fix(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(SourceError, match="DISPLAY"):
        open_source("screen")


def test_read_after_close_is_an_error():
    src = open_source("synthetic:3")
    src.close()
    src.close()  # idempotent
    with pytest.raises(SourceError, match="after close"):
        src.read()
