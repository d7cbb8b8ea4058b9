"""Fixtures for the real-OBS tests: a headless OBS (Xvfb) running the sdlive script, and a real sdlive daemon
(tiny model, CPU) that the tests can kill and restart on the same address. The machinery is in ``harness.py``.

Each test module shares one daemon and one OBS (starting them costs seconds); tests that change global state
(killing the daemon, reloading the script) come last in their module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .harness import SCRIPT, SCRIPT_NAMES, HeadlessOBS, RestartableDaemon, missing_tools, screenshot, wait_until

CANVAS = (320, 176)  # multiples of 16: the daemon session runs at the source size, pixels compare 1:1
SOURCE_NAME = "bg"
SOURCE_COLOR_ABGR = 0xFF2060C0  # OBS colours are ABGR: R=0xC0 G=0x60 B=0x20
SOURCE_RGB = np.array([0xC0, 0x60, 0x20], dtype=np.float64)


def obs_skip_reason() -> str | None:
    missing = missing_tools()
    if missing:
        return f"real-OBS tests need {', '.join(missing)} (Debian: apt-get install obs-studio xvfb xauth)"
    if not sys.platform.startswith("linux"):
        return "real-OBS tests run on Linux under Xvfb"
    return None


def pytest_collection_modifyitems(config, items):
    reason = obs_skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("obs") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


# ---------------------------------------------------------------------------------------------------- daemon


@pytest.fixture(scope="module")
def obs_daemon(tmp_path_factory, launch_daemon):
    d = RestartableDaemon(launch_daemon, tmp_path_factory.mktemp("daemon"))
    d.start()
    yield d
    d.stop()


# ------------------------------------------------------------------------------------------------------- OBS


class ObsUnderTest:
    """A headless OBS running the sdlive script, plus what the tests read back from it."""

    def __init__(self, home: Path, env: dict):
        self.home = home
        self.stats_path = home / "sdlive-stats.json"
        self.obs = HeadlessOBS(home, width=CANVAS[0], height=CANVAS[1], scripts=[SCRIPT],
                               env={SCRIPT_NAMES.ENV_STATS: str(self.stats_path), **env})
        self.client = None

    def start(self) -> ObsUnderTest:
        self.obs.start()
        self.client = self.obs.client()
        return self

    def stop(self) -> int | None:
        if self.client is not None:
            try:
                self.client.disconnect()
            except Exception:  # noqa: BLE001
                pass
            self.client = None
        return self.obs.stop()

    def stats(self) -> dict:
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def filter_stats(self, name: str = "sdlive") -> dict:
        for f in self.stats().get("filters", []):
            if f.get("name") == name:
                return f
        return {}

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.2):
        return wait_until(predicate, timeout, what, interval_s=interval,
                          context=lambda: f"; stats: {self.stats()}\nOBS log (sdlive lines):\n{self.sdlive_log()}")

    def sdlive_log_lines(self) -> list[str]:
        """Every sdlive line of OBS's log files (each once: not the copy OBS also prints to stdout)."""
        lines = []
        for p in sorted(self.obs.log_dir.glob("*.txt")) if self.obs.log_dir.is_dir() else []:
            lines += [ln for ln in p.read_text(errors="replace").splitlines() if "[sdlive]" in ln]
        return lines

    def sdlive_log(self) -> str:
        return "\n".join(line for line in self.obs.log_text().splitlines() if "sdlive" in line)[-4000:]

    def screenshot(self, source: str = SOURCE_NAME, size: tuple[int, int] = CANVAS) -> np.ndarray:
        return screenshot(self.client, source, size[0], size[1])

    def add_color_source(self, name: str = SOURCE_NAME, color: int = SOURCE_COLOR_ABGR,
                         size: tuple[int, int] = CANVAS) -> None:
        self.client.create_input("Main", name, "color_source_v3",
                                 {"color": color, "width": size[0], "height": size[1]}, True)

    def add_filter(self, address: str, source: str = SOURCE_NAME,
                   name: str = SCRIPT_NAMES.FILTER_DISPLAY_NAME) -> None:
        """An sdlive filter on ``source`` that connects to the daemon at ``address``."""
        self.client.create_source_filter(source, name, SCRIPT_NAMES.FILTER_ID, {SCRIPT_NAMES.SETTING_ADDRESS: address})


def start_obs(tmp_path_factory, daemon=None, **env) -> ObsUnderTest:
    """A started headless OBS; with ``daemon``, the colour source in the scene and an sdlive filter on it."""
    home = tmp_path_factory.mktemp("obs")
    o = ObsUnderTest(home, {k: str(v) for k, v in env.items()}).start()
    if daemon is not None:
        o.add_color_source()
        o.add_filter(daemon.control_address)
    return o


def distance_to_source(img: np.ndarray) -> float:
    """Mean absolute difference (0-255) between a screenshot and the colour source's colour."""
    return float(np.abs(img.astype(np.float64) - SOURCE_RGB).mean())


def output_ring_frames(name: str, seconds: float = 1.0) -> dict[int, np.ndarray]:
    """Every frame the session's output ring holds during ``seconds`` (seq → RGB), read straight from the
    documented slot layout without touching the ring's counters (the OBS script is its consumer)."""
    import mmap

    from sdlive.daemon.protocol import ring as ringmod

    ring = ringmod.FrameRing.open(name, observer=True)
    w, h, slots, slot_size = ring.width, ring.height, ring.slots, ring.slot_size
    ring.close()
    frames: dict[int, np.ndarray] = {}
    with open(ringmod.ring_path(name), "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            deadline = time.monotonic() + seconds
            while True:
                for i in range(slots):
                    base = ringmod.HEADER_SIZE + i * slot_size
                    seq1 = int.from_bytes(mm[base : base + 8], "little")
                    if seq1 == 0 or seq1 % 2 or seq1 // 2 in frames:
                        continue
                    start = base + ringmod.SLOT_HEADER_SIZE
                    px = np.frombuffer(mm[start : start + w * h * 4], np.uint8).reshape(h, w, 4)
                    if int.from_bytes(mm[base : base + 8], "little") == seq1:  # not torn
                        frames[seq1 // 2] = px[:, :, [2, 1, 0]].copy()  # BGRA → RGB
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        finally:
            mm.close()
    return frames


# ------------------------------------------------------------------------------------------ media files


def pattern(seed: int = 0) -> np.ndarray:
    """A CANVAS-sized RGB test card: eight flat blocks of distinct colours and a grey ramp (blocks survive scaling and 4:2:0
    chroma; the ramp catches a channel swap or a colour-range change)."""
    W, H = CANVAS
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.uint8)
    colors = rng.integers(30, 226, size=(8, 3))
    for i, c in enumerate(colors):
        x0, y0 = (i % 4) * W // 4, (i // 4) * (H // 2 - 16)
        img[y0 : y0 + H // 2 - 16, x0 : x0 + W // 4] = c
    img[H - 32 :, :] = np.linspace(0, 255, W, dtype=np.uint8)[None, :, None]
    return img


def write_png(path: Path, rgb: np.ndarray) -> Path:
    import cv2

    assert cv2.imwrite(str(path), rgb[:, :, ::-1])
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    files = {"image": write_png(d / "card.png", pattern(1)), "slide": write_png(d / "slide.png", pattern(2)),
             "video_frame": write_png(d / "video.png", pattern(3))}
    # a lossless, looping video of one test card: what a media source decodes is exactly the card
    files["video"] = d / "card.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-loop", "1", "-framerate", "30", "-i", str(files["video_frame"]),
                    "-t", "2", "-c:v", "ffv1", "-pix_fmt", "bgra", str(files["video"])], check=True, timeout=60)
    return files
