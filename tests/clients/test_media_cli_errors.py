"""`sdlive cam` / `render` / `demo` fail fast with one clear message and a non-zero exit code when the input, the
output or the daemon is missing (checked before any daemon is started)."""

from __future__ import annotations

import glob
import platform
import socket

import pytest
from typer.testing import CliRunner

from sdlive.obs_bridge.cli import app
from sdlive.obs_bridge.media.pump import PresetSwitcher

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_cam_without_a_webcam_exits_nonzero_naming_the_fix():
    code, out = _run("cam", "--input", "webcam:97", "--output", "none", "--daemon", _dead_address())
    assert code == 1
    assert "cannot open webcam 97" in out and "Plug a webcam in" in out


@pytest.mark.skipif(platform.system() == "Linux" and bool(glob.glob("/dev/video*")),
                    reason="this machine has video devices: a v4l2loopback camera may exist")
def test_cam_without_a_virtual_camera_backend_exits_nonzero_naming_the_fix():
    code, out = _run("cam", "--input", "synthetic", "--output", "vcam", "--daemon", _dead_address())
    assert code == 1
    assert "no virtual camera could be opened" in out
    if platform.system() == "Linux":
        assert "sudo modprobe v4l2loopback devices=1 exclusive_caps=1" in out


def test_render_of_an_unreadable_file_exits_nonzero(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00garbage" * 200)
    code, out = _run("render", str(junk), "-o", str(tmp_path / "out.mp4"), "--daemon", _dead_address())
    assert code == 1 and "cannot decode video file" in out
    code, out = _run("render", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "out.mp4"))
    assert code == 1 and "video file not found" in out


def test_render_to_an_unknown_format_or_of_an_endless_input_exits_nonzero(tmp_path, media):
    clip = media.make_clip(tmp_path / "clip.mp4", frames=4, fps=12, width=32, height=32)
    code, out = _run("render", str(clip), "-o", str(tmp_path / "out.xyz"), "--daemon", _dead_address())
    assert code == 1 and "unknown video extension '.xyz'" in out
    code, out = _run("render", "synthetic", "-o", str(tmp_path / "out.mp4"), "--daemon", _dead_address())
    assert code == 1 and "has no end" in out


def test_commands_with_an_unreachable_daemon_name_sdlive_serve(tmp_path, media):
    clip = media.make_clip(tmp_path / "clip.mp4", frames=4, fps=12, width=32, height=32)
    code, out = _run("render", str(clip), "-o", str(tmp_path / "out.mp4"), "--daemon", _dead_address())
    assert code == 1 and "sdlive serve" in out
    code, out = _run("cam", "--input", "synthetic", "--output", "none", "--daemon", _dead_address())
    assert code == 1 and "sdlive serve" in out


def test_bad_options_are_usage_errors():
    code, _ = _run("render", "clip.mp4", "-o", "out.mp4", "--steps", "9")
    assert code == 2
    code, out = _run("cam", "--input", "synthetic", "--attach", "abc")
    assert code == 2 and "either --input or --attach" in out


def test_preset_keys_pick_by_number_and_cycle():
    sw = PresetSwitcher(["anime", "cyberpunk", "van-gogh"], current="anime")
    assert sw.key("3") == "van-gogh"
    assert sw.key("n") == "anime"
    assert sw.key("p") == "van-gogh"
    assert sw.key("p") == "cyberpunk"
    assert sw.key("9") is None and sw.current == "cyberpunk"
    assert sw.key("0") is None and sw.key("x") is None
    assert PresetSwitcher([]).key("1") is None
    fresh = PresetSwitcher(["a", "b"])
    assert fresh.current is None and fresh.key("n") == "a"


def test_client_media_modules_never_import_torch():
    import subprocess
    import sys

    code = ("import sys; import sdlive.obs_bridge.cli, sdlive.obs_bridge.media.capture, sdlive.obs_bridge.media.sinks, "
            "sdlive.obs_bridge.media.pump, sdlive.obs_bridge.media.vcam, sdlive.obs_bridge.cli.media; "
            "from sdlive.obs_bridge.cli.autostart import pick_model; pick_model('cpu'); "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=180)
