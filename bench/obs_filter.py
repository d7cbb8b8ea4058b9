"""Benchmark the sdlive OBS filter inside a real OBS (Xvfb, software GL here) with a real daemon.

    python bench/obs_filter.py --size 1280x720 --json OUT.json [--source image|colour|media] [--seconds 20]
                               [--model tiny] [--device cpu]

Figures (measured by the script inside OBS with perf_counter_ns / monotonic_ns, read from its stats file):
- ``render_thread_ms_p50/p99``: time the filter adds to OBS's graphics thread per captured frame (draw the source
  into a texrender, stage it, map the previous frame's stage surface, copy it into the input ring, upload the newest
  output frame, draw). Views after the first in the same frame only draw.
- ``end_to_end_ms_p50``: from a frame's capture in OBS to its restyled frame being uploaded for display (includes the
  daemon's model time and its latency in frames).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import moving_shapes, parse_size, report, stamp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    """The test suite's helpers (tests/conftest.py: the daemon launcher; tests/obs/harness.py: the headless OBS),
    loaded by path under distinct names: tests/ is not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def source_input(kind: str, image: Path, work: Path) -> tuple[str, dict]:
    """The OBS input kind and settings of the source under test."""
    if kind == "colour":
        import cv2

        h, w = cv2.imread(str(image)).shape[:2]
        return "color_source_v3", {"color": 0xFF2060C0, "width": w, "height": h}
    if kind == "media":
        import subprocess

        video = work / "pattern.mkv"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-loop", "1", "-framerate", "30", "-i", str(image), "-t", "2",
                        "-c:v", "ffv1", "-pix_fmt", "bgra", str(video)], check=True, timeout=120)
        return "ffmpeg_source", {"local_file": str(video), "looping": True, "is_local_file": True}
    return "image_source", {"file": str(image)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1280x720", help="source and canvas size, WxH")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement window after warm-up")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--source", choices=("image", "colour", "media"), default="image",
                    help="the filtered source: a test picture (image_source), a colour, or a looping video of it")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--keep", action="store_true", help="keep the OBS home folder (logs) and print its path")
    args = ap.parse_args()
    width, height = parse_size(args.size)

    import cv2

    work = Path(tempfile.mkdtemp(prefix="sdlive-obs-bench-"))
    image = work / "pattern.png"
    cv2.imwrite(str(image), moving_shapes(width, height, 1)[0][:, :, ::-1])
    stats_path = work / "stats.json"
    suite = _load("sdlive_tests_conftest", REPO / "tests" / "conftest.py")
    harness = _load("sdlive_tests_obs_harness", REPO / "tests" / "obs" / "harness.py")

    def launch(workdir, **kw):  # `sdlive serve` with the model and device under test (flags given later win)
        return suite.start_daemon(workdir, "--model", args.model, "--device", args.device, **kw)

    daemon = harness.RestartableDaemon(launch, work)
    obs = harness.HeadlessOBS(work / "home", width=width, height=height, fps=args.fps, scripts=[harness.SCRIPT],
                              screen=f"{max(1280, width)}x{max(720, height)}x24",
                              env={harness.SCRIPT_NAMES.ENV_STATS: str(stats_path)})

    def filt() -> dict:
        try:
            return json.loads(stats_path.read_text())["filters"][0]
        except (OSError, ValueError, IndexError, KeyError):
            return {}

    try:
        daemon.start()
        obs.start()
        cl = obs.client()
        kind, settings = source_input(args.source, image, work)
        cl.create_input("Main", "src", kind, settings, True)
        names = harness.SCRIPT_NAMES
        cl.create_source_filter("src", names.FILTER_DISPLAY_NAME, names.FILTER_ID,
                                {names.SETTING_ADDRESS: daemon.control_address})
        harness.wait_until(lambda: filt().get("frames_out", 0) > 0, 120, "the first output frame")
        time.sleep(args.warmup)
        f0 = filt()
        time.sleep(args.seconds)
        f1 = filt()
        status = daemon.sessions()
        version = cl.get_version()
        cl.disconnect()
    finally:
        obs.stop()
        daemon.stop()
    log = obs.log_text()
    adapter = next((line.split("adapter", 1)[1].strip() for line in log.splitlines() if "Loading up OpenGL on adapter" in line), "?")
    frames = f1["frames_in"] - f0["frames_in"]
    outs = f1["frames_out"] - f0["frames_out"]
    result = {
        **stamp(),
        "bench": "obs_filter",
        "size": [width, height],
        "source": args.source,
        "fps_target": args.fps,
        "model": args.model,
        "device": args.device,
        "obs_version": version.obs_version,
        "gpu_adapter": adapter,
        "render_thread_ms_p50": f1["render_thread_ms_p50"],
        "render_thread_ms_p99": f1["render_thread_ms_p99"],
        "render_samples": f1["render_samples"],
        "end_to_end_ms_p50": f1["end_to_end_ms_p50"],
        "frames_in_per_s": frames / args.seconds,
        "frames_out_per_s": outs / args.seconds,
        "daemon_session": status[0] if status else None,
        "note": "render-thread figures come from the script (perf_counter_ns around each capturing video_render)",
    }
    rows = [
        ("source", f"{args.source}, {width}x{height} @ {args.fps} fps"),
        ("GL adapter", adapter),
        ("render thread p50 (ms)", result["render_thread_ms_p50"]),
        ("render thread p99 (ms)", result["render_thread_ms_p99"]),
        ("end to end p50 (ms)", result["end_to_end_ms_p50"]),
        ("frames into the daemon / s", result["frames_in_per_s"]),
        ("styled frames shown / s", result["frames_out_per_s"]),
    ]
    report(f"sdlive OBS filter ({args.model} on {args.device})", rows, result, args.json_path)
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
