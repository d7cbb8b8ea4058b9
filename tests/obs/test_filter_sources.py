"""Every kind of source a streamer filters reaches the daemon with its real pixels: an image, a media file, a colour,
a text, a slideshow and a display capture (the Xvfb screen). Each test puts the sdlive filter on one source, reads
the frames the filter wrote into the session's input ring (as an observer, beside the daemon) and compares them with
the source's known content; the screenshot OBS renders of the source with the filter disabled is the reference
where the content is OBS's own drawing (text)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import CANVAS, ObsUnderTest, output_ring_frames, pattern, write_png
from .harness import SCRIPT

pytestmark = [pytest.mark.obs, pytest.mark.slow]

W, H = CANVAS  # multiples of 16: the session runs at the source size, pixels compare 1:1
SAME = 3.0  # mean |received - expected| (0-255) below this: the source's own pixels
SCREEN = (640, 480)
DUMP = Path(os.environ["SDLIVE_TEST_DUMP"]) if os.environ.get("SDLIVE_TEST_DUMP") else None  # images to look at  # the Xvfb screen the display capture sees


@pytest.fixture(scope="module")
def obs(tmp_path_factory, obs_daemon):
    home = tmp_path_factory.mktemp("obs-sources")
    o = ObsUnderTest(home, {})
    o.obs.screen = f"{SCREEN[0]}x{SCREEN[1]}x24"
    o.obs.scripts = [SCRIPT]
    o.start()
    yield o
    o.stop()


def received_frame(obs: ObsUnderTest, filter_name: str) -> np.ndarray:
    """The newest frame the filter wrote into its session's input ring (RGB), once several went out."""
    f = obs.wait_for(lambda: (lambda s: s if s.get("input_ring") and s.get("frames_in", 0) > 5 else None)(
        obs.filter_stats(filter_name)), 60, f"filter {filter_name!r} to send frames")
    frames = output_ring_frames(f["input_ring"], 0.3)
    assert frames, "no complete frame in the input ring"
    return frames[max(frames)]


def source_with_filter(obs: ObsUnderTest, daemon, name: str, kind: str, settings: dict) -> str:
    obs.client.create_input("Main", name, kind, settings, True)
    filter_name = f"sdlive-{name}"
    obs.add_filter(daemon.control_address, name, filter_name)
    return filter_name


def unfiltered_screenshot(obs: ObsUnderTest, source: str, filter_name: str, size: tuple[int, int]) -> np.ndarray:
    """OBS's own rendering of ``source`` (width, height = ``size``) with the sdlive filter off."""
    obs.client.set_source_filter_enabled(source, filter_name, False)
    time.sleep(0.3)
    try:
        return obs.screenshot(source, size)
    finally:
        obs.client.set_source_filter_enabled(source, filter_name, True)


def diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"{a.shape} != {b.shape}"
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def check(obs, daemon, name, kind, settings, expected: np.ndarray | None = None) -> np.ndarray:
    """Filter a source; its input-ring frame must equal ``expected``, or else the unfiltered screenshot (which must
    show something: a blank reference would prove nothing)."""
    filter_name = source_with_filter(obs, daemon, name, kind, settings)
    try:
        got = received_frame(obs, filter_name)
        if expected is None:
            expected = unfiltered_screenshot(obs, name, filter_name, (got.shape[1], got.shape[0]))
            assert expected.std() > 5, f"{kind}: OBS's own screenshot of the source is flat; nothing to compare"
        d = diff(got, expected)
        if DUMP:
            write_png(DUMP / f"{name}-received.png", got)
            write_png(DUMP / f"{name}-expected.png", np.ascontiguousarray(expected))
        assert d < SAME, (f"{kind}: received pixels differ from the source's (mean |diff| {d:.2f}; received mean "
                          f"{got.mean():.1f}, source mean {expected.mean():.1f})")
        return got
    finally:
        obs.client.remove_input(name)
        obs.wait_for(lambda: not obs.filter_stats(filter_name), 10, f"{filter_name} to be destroyed")


def test_image_source_reaches_the_daemon(obs, obs_daemon, media):
    check(obs, obs_daemon, "image", "image_source", {"file": str(media["image"])}, pattern(1))


def test_media_source_reaches_the_daemon(obs, obs_daemon, media):
    check(obs, obs_daemon, "media", "ffmpeg_source",
          {"local_file": str(media["video"]), "looping": True, "is_local_file": True}, pattern(3))


def test_slideshow_reaches_the_daemon(obs, obs_daemon, media):
    check(obs, obs_daemon, "slides", "slideshow",
          {"files": [{"value": str(media["slide"]), "hidden": False, "selected": False}],
           "use_custom_size": f"{W}x{H}", "transition": "cut"}, pattern(2))  # no fade-in: a frame is the slide


def test_colour_source_reaches_the_daemon(obs, obs_daemon):
    expected = np.broadcast_to(np.array([0xC0, 0x60, 0x20], np.uint8), (H, W, 3))
    check(obs, obs_daemon, "colour", "color_source_v3", {"color": 0xFF2060C0, "width": W, "height": H}, expected)


def test_text_source_reaches_the_daemon(obs, obs_daemon):
    """Linux's text source (FreeType 2): white glyphs on transparent; compared with OBS's own rendering of it."""
    check(obs, obs_daemon, "text", "text_ft2_source_v2",
          {"text": "sdlive 123", "font": {"face": "DejaVu Sans", "size": 96, "style": "Bold", "flags": 1},
           "color1": 0xFFFFFFFF, "color2": 0xFFFFFFFF, "custom_width": W, "word_wrap": False})


# A borderless window at the screen's top-left corner showing a test card, kept above OBS's own windows.
CARD_WINDOW = """
import sys, tkinter as tk
root = tk.Tk(); root.overrideredirect(True); root.geometry(f"{sys.argv[2]}x{sys.argv[3]}+0+0")
img = tk.PhotoImage(file=sys.argv[1])
tk.Label(root, image=img, borderwidth=0, highlightthickness=0).pack()
def top(): root.lift(); root.after(100, top)
top(); root.mainloop()
"""


def test_display_capture_reaches_the_daemon(obs, obs_daemon, media, tmp_path):
    """xshm_input of the Xvfb screen, cropped to the session size, where a window shows a known test card."""
    card = write_png(tmp_path / "screen.png", pattern(4))
    env = {**os.environ, "DISPLAY": f":{obs.obs.display}"}
    window = subprocess.Popen([sys.executable, "-c", CARD_WINDOW, str(card), str(W), str(H)], env=env)
    try:
        time.sleep(1.0)  # mapped and drawn
        check(obs, obs_daemon, "screen", "xshm_input",
              {"screen": 0, "show_cursor": False, "cut_right": SCREEN[0] - W, "cut_bot": SCREEN[1] - H}, pattern(4))
    finally:
        window.terminate()
        window.wait(10)


def test_capturing_every_kind_of_source_left_no_draw_error_in_the_log(obs):
    """A target drawn outside an effect makes libobs log "No vertex shader specified" for every frame."""
    log = obs.obs.log_text()
    assert "No vertex shader specified" not in log and "device_draw (GL) failed" not in log
