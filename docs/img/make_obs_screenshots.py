"""Regenerate the OBS screenshots of docs/obs.md from a real OBS under Xvfb (Linux; needs obs-studio, xvfb, xdotool,
ffmpeg, and a working `sdlive serve --model tiny`). The main window shows a test picture as it is (left) and through
the sdlive filter (right).

    python docs/img/make_obs_screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

SCREEN = (1280, 800)


def grab(display: int, out: Path, *, crop: tuple[int, int, int, int] | None = None, width: int = 960) -> None:
    """One frame of the X display as a small PNG (cropped to x, y, w, h; scaled to ``width``; 64-colour palette)."""
    raw = out.with_suffix(".raw.png")
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "x11grab", "-video_size", f"{SCREEN[0]}x{SCREEN[1]}",
         "-i", f":{display}", "-frames:v", "1", str(raw)],
        check=True, timeout=30,
    )
    vf = []
    if crop:
        x, y, w, h = crop
        vf.append(f"crop={w}:{h}:{x}:{y}")
    vf.append(f"scale={width}:-1:flags=lanczos,split[a][b];[a]palettegen=max_colors=64[p];[b][p]paletteuse=dither=none")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-filter_complex", ",".join(vf), str(out)],
                   check=True, timeout=30)
    raw.unlink()
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


def xdo(display: int, *args: str) -> str:
    return subprocess.run(["xdotool", *args], capture_output=True, text=True, env={"DISPLAY": f":{display}"},
                          timeout=20).stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "docs" / "img"))
    args = ap.parse_args()
    out = Path(args.out)
    import cv2
    from common import moving_shapes
    from obs_filter import _load

    work = Path(tempfile.mkdtemp(prefix="sdlive-shots-"))
    image = work / "camera.png"
    cv2.imwrite(str(image), moving_shapes(640, 352, 1)[0][:, :, ::-1])
    suite = _load("sdlive_tests_conftest", REPO / "tests" / "conftest.py")
    harness = _load("sdlive_tests_obs_harness", REPO / "tests" / "obs" / "harness.py")
    daemon = harness.RestartableDaemon(suite.start_daemon, work)
    obs = harness.HeadlessOBS(work / "home", width=640, height=352, scripts=[harness.SCRIPT],
                              minimize=False, screen=f"{SCREEN[0]}x{SCREEN[1]}x24")
    obs.write_config()
    ini = harness.obs_setup.read_ini(obs.config_dir / "global.ini")
    ini["BasicWindow"] = {"SpacingHelpersEnabled": "false"}  # no distance guides around the selected source
    harness.obs_setup.write_ini(obs.config_dir / "global.ini", ini)
    try:
        daemon.start()
        obs.start()
        d = obs.display
        cl = obs.client()
        # the same picture twice, side by side: as it is (left) and through the sdlive filter (right)
        cl.create_input("Main", "Camera (plain)", "image_source", {"file": str(image)}, True)
        cl.create_input("Main", "Camera", "image_source", {"file": str(image)}, True)
        for name, x in (("Camera (plain)", 0.0), ("Camera", 320.0)):
            item = cl.get_scene_item_id("Main", name).scene_item_id
            cl.set_scene_item_transform("Main", item, {"positionX": x, "positionY": 88.0, "scaleX": 0.5, "scaleY": 0.5})
        cl.create_source_filter("Camera", "sdlive", "sdlive_filter",
                                {"daemon_address": daemon.control_address, "preset": "anime"})
        time.sleep(12)
        grab(d, out / "obs_main.png", crop=(0, 0, 1079, 729), width=760)
        cl.send("OpenInputFiltersDialog", {"inputName": "Camera"})
        time.sleep(2)
        win = xdo(d, "search", "--name", "Filters for").split()
        if win:
            xdo(d, "windowsize", win[0], "1000", "700", "windowmove", win[0], "140", "50")
            time.sleep(1.5)
            grab(d, out / "obs_filter_properties.png", crop=(140, 50, 1000, 700), width=800)
            xdo(d, "windowclose", win[0])
        time.sleep(1)
        # Tools → Scripts (positions of OBS 29's default 1079×729 main window)
        xdo(d, "mousemove", "378", "12", "click", "1")
        time.sleep(1)
        xdo(d, "mousemove", "388", "146", "click", "1")
        time.sleep(2)
        win = xdo(d, "search", "--name", "^Scripts$").split()
        if win:
            xdo(d, "windowsize", win[0], "900", "520", "windowmove", win[0], "100", "60")
            time.sleep(1)
            xdo(d, "mousemove", "250", "150", "click", "1")  # select the script: description + settings show
            time.sleep(1.5)
            grab(d, out / "obs_scripts.png", crop=(100, 60, 900, 520), width=760)
            xdo(d, "windowclose", win[0])
        time.sleep(1)
        # Settings → Hotkeys, filtered on "sdlive"
        xdo(d, "mousemove", "980", "649", "click", "1")
        time.sleep(2)
        xdo(d, "mousemove", "112", "212", "click", "1")
        time.sleep(1.5)
        xdo(d, "mousemove", "418", "28", "click", "1")
        xdo(d, "type", "sdlive")
        time.sleep(1.5)
        grab(d, out / "obs_hotkeys.png", crop=(39, 0, 981, 730), width=760)
        xdo(d, "key", "Escape")
        cl.disconnect()
    finally:
        obs.stop()
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
