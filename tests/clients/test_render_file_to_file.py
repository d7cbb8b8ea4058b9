"""`sdlive render` file to file through a real daemon (tiny model): every input frame gets one restyled output
frame (the tail is flushed by padding, so the count is kept exactly), the size and fps are kept, the audio is
copied, and `--side-by-side` puts the input left of the output at twice the width."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from typer.testing import CliRunner

from sdlive.obs_bridge.cli import app

runner = CliRunner()
FRAMES, FPS, SIZE = 20, 12, 128


def _render(*args):
    result = runner.invoke(app, ["render", *map(str, args)])
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.slow
def test_render_keeps_frame_count_size_fps_and_audio(daemon, tmp_path, media):
    src = media.make_clip(tmp_path / "in.mp4", frames=FRAMES, fps=FPS, width=SIZE, height=SIZE, audio=True)
    out = tmp_path / "out.mp4"
    code, text = _render(src, "-o", out, "--preset", "anime", "--steps", "1", "--daemon", daemon.control_address)
    assert code == 0, text
    assert f"wrote {out}: {FRAMES} frames at {FPS} fps, {SIZE}x{SIZE} with audio" in text
    streams = {s["codec_type"]: s for s in media.probe(out)["streams"]}
    video = streams["video"]
    assert int(video["nb_read_frames"]) == FRAMES
    assert (video["width"], video["height"]) == (SIZE, SIZE)
    assert Fraction(video["r_frame_rate"]) == FPS
    assert streams["audio"]["codec_name"] == "aac" and float(streams["audio"]["duration"]) > 0.9 * FRAMES / FPS
    # restyled, not copied: the tiny model's frames are far from the input
    inp, got = media.read_frames(src), media.read_frames(out)
    assert len(got) == FRAMES
    assert np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(inp, got, strict=True)]) > 10


@pytest.mark.slow
def test_render_side_by_side_doubles_the_width_with_the_input_on_the_left(daemon, tmp_path, media):
    src = media.make_clip(tmp_path / "in.mp4", frames=12, fps=FPS, width=SIZE, height=SIZE)
    out = tmp_path / "sbs.mkv"
    code, text = _render(src, "-o", out, "--side-by-side", "--daemon", daemon.control_address)
    assert code == 0, text
    video = media.video_stream(media.probe(out))
    assert (video["width"], video["height"], int(video["nb_read_frames"])) == (2 * SIZE, SIZE, 12)
    inp, got = media.read_frames(src), media.read_frames(out)
    left = [np.abs(a.astype(int) - b[:, :SIZE].astype(int)).mean() for a, b in zip(inp, got, strict=True)]
    right = [np.abs(a.astype(int) - b[:, SIZE:].astype(int)).mean() for a, b in zip(inp, got, strict=True)]
    assert max(left) < 6 < min(right)  # the left half is the input (through the encoder), the right is restyled


@pytest.mark.slow
def test_render_with_an_unknown_preset_names_the_known_ones_and_leaves_no_file(daemon, tmp_path, media):
    src = media.make_clip(tmp_path / "in.mp4", frames=4, fps=FPS, width=64, height=64)
    out = tmp_path / "out.mp4"
    code, text = _render(src, "-o", out, "--preset", "no-such-style", "--daemon", daemon.control_address)
    assert code == 1
    assert "unknown preset 'no-such-style'" in text and "anime" in text
    assert not out.exists()  # no half-written file left behind


@pytest.mark.slow
def test_render_runs_as_fast_as_the_model_goes_and_a_prompt_changes_the_frames(daemon, tmp_path, media):
    """Offline pacing: 15 s of a 2 fps clip render in far less than 15 s; the first output is never black (a daemon
    that drops it is filled from the next); a 640x360-style size (here 100x60) rounds to 96x48 and back; a typed
    prompt gives other frames than the preset's alone (the tiny model is deterministic)."""
    import time

    src = media.make_clip(tmp_path / "in.mp4", frames=30, fps=2, width=100, height=60)
    started = time.monotonic()
    code, text = _render(src, "-o", tmp_path / "a.mp4", "--preset", "anime", "--daemon", daemon.control_address)
    took = time.monotonic() - started
    assert code == 0, text
    assert took < 10, f"an offline render of 15 s of video took {took:.1f} s"
    assert "100x60 is restyled at 96x48" in text and "30 frames at 2 fps, 100x60" in text
    code, text = _render(src, "-o", tmp_path / "b.mp4", "--preset", "anime", "--prompt", "a pencil sketch",
                         "--daemon", daemon.control_address)
    assert code == 0, text
    plain, prompted = media.read_frames(tmp_path / "a.mp4"), media.read_frames(tmp_path / "b.mp4")
    assert len(plain) == len(prompted) == 30
    assert min(float(f.mean()) for f in plain) > 5  # no black padding frame at the start
    assert np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(plain, prompted, strict=True)]) > 3
