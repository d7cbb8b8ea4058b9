"""The CLI as a user meets it before any daemon runs: a mistyped address is one clear line and exit 1 in every
command, sizes round as the OBS filter does, a bad preset or prompt is refused before a daemon is started, one
preset numbering, `--version`/`-h`, and a status table that is never cut at 100 columns."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sdlive.daemon.protocol.messages import SessionStats, StatusReply
from sdlive.daemon.server.ui import status_table
from sdlive.obs_bridge.cli import app
from sdlive.obs_bridge.cli.checks import CheckError, session_size, size_note
from sdlive.obs_bridge.media.pump import PresetSwitcher, preset_numbers

runner = CliRunner()

BAD_ADDRESSES = {
    "localhost:7557": "did you mean tcp://localhost:7557",
    "tcp://nohost": "has no port",
    "foo": "not a ZeroMQ endpoint",
    "tcp://127.0.0.1:notaport": "is not a number from 1 to 65535",
    "tcp://no-such-host.invalid:5557": "does not resolve",
}


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.output


def _one_clear_line(code: int, out: str, needle: str) -> None:
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 1, out
    assert "Traceback" not in out and len(lines) == 1, out
    assert lines[0].startswith("error: ") and needle in lines[0] and "tcp://" in lines[0], out


@pytest.mark.parametrize("address", list(BAD_ADDRESSES))
def test_a_mistyped_address_is_one_line_and_exit_1_in_every_command(address, tmp_path):
    needle = BAD_ADDRESSES[address]
    clip = tmp_path / "clip.mp4"  # never opened: the address is checked first
    for args in (("status", "--address", address), ("preset", "--address", address), ("preset", "anime", "-a", address),
                 ("prompt", "a cat", "-a", address), ("shutdown", "--address", address),
                 ("cam", "--input", "synthetic", "--output", "none", "--daemon", address),
                 ("render", str(clip), "-o", str(tmp_path / "out.mp4"), "--daemon", address)):
        code, out = _run(*args)
        _one_clear_line(code, out, needle)
    # the same address from the environment says where it came from
    code, out = _run("status", env={"SDLIVE_CONTROL": address})
    _one_clear_line(code, out, needle)
    assert "SDLIVE_CONTROL" in out


def test_an_address_from_config_toml_is_used_by_status(tmp_path):
    config = tmp_path / "config.toml"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    config.write_text(f'control = "{dead}"\n')
    code, out = _run("status", "--timeout", "0.3", env={"SDLIVE_CONFIG": str(config), "SDLIVE_CONTROL": ""})
    assert code == 1 and dead in out and "sdlive serve" in out and "Traceback" not in out


def test_version_and_short_help():
    code, out = _run("--version")
    assert code == 0 and out.startswith("sdlive ") and "protocol sdlive/" in out
    code, out = _run("-h")
    assert code == 0 and "Usage" in out and "prompt" in out
    code, out = _run("render", "-h")
    assert code == 0 and "--prompt" in out


def test_sizes_round_down_to_the_daemons_multiple_like_the_obs_filter():
    assert session_size(640, 360) == (640, 352)
    assert session_size(854, 480) == (848, 480)
    assert session_size(512, 512) == (512, 512) and size_note(512, 512) is None
    assert "640x352" in size_note(640, 360) and "scaled back to 640x360" in size_note(640, 360)
    with pytest.raises(CheckError, match="too small"):
        session_size(8, 360)
    with pytest.raises(CheckError, match="too large"):
        session_size(9000, 360)


def test_bad_preset_prompt_or_size_is_refused_before_a_daemon_is_started(tmp_path, media):
    clip = media.make_clip(tmp_path / "clip.mp4", frames=4, fps=12, width=64, height=36)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = f"tcp://127.0.0.1:{s.getsockname()[1]}"  # nothing listens: a command would start a daemon here
    env = {"SDLIVE_CONTROL": free}
    started = time.monotonic()
    code, out = _run("render", str(clip), "-o", str(tmp_path / "o.mp4"), "--preset", "nope", env=env)
    assert code == 1 and "unknown preset 'nope'" in out and "anime" in out
    code, out = _run("render", str(clip), "-o", str(tmp_path / "o.mp4"), "--prompt", "x" * 5000, env=env)
    assert code == 1 and "prompt" in out and "2000" in out
    code, out = _run("cam", "-i", "synthetic", "-o", "none", "--prompt", "  ", env=env)
    assert code == 1 and "--prompt is empty" in out
    code, out = _run("render", str(clip), "-o", str(tmp_path / "o.mp4"), "--height", "8", env=env)
    assert code == 1 and "too small" in " ".join(out.split())
    assert time.monotonic() - started < 20  # no daemon was started for any of them
    assert not (tmp_path / "o.mp4").exists()


def test_one_preset_numbering_from_the_hotkeys_for_list_and_keys():
    presets = [("anime", "ctrl+shift+1"), ("watercolor", "ctrl+shift+2"), ("cyberpunk", "ctrl+shift+3"),
               ("mine", None), ("also-mine", None)]
    numbers = preset_numbers(presets)
    assert numbers == {"anime": 1, "watercolor": 2, "cyberpunk": 3, "also-mine": 4, "mine": 5}
    sw = PresetSwitcher([name for name, _ in presets], current="anime", numbers=numbers)
    assert sw.key("2") == "watercolor"  # not the 2nd name in alphabetical order (also-mine)
    assert sw.key("n") == "cyberpunk" and sw.key("n") == "also-mine"
    sw.follow("anime")  # switched elsewhere (an OBS hotkey): next goes on from there
    assert sw.key("n") == "watercolor"
    assert sw.help().startswith("1:anime  2:watercolor  3:cyberpunk  4:also-mine  5:mine")


def _status() -> StatusReply:
    sessions = [
        SessionStats(session_id="d53e59cf9caf", client="sdlive-cam", width=1280, height=720, fps=30.0,
                     pixel_format="bgr24", latency_frames=8, preset="oil-painting", fps_in=29.97, fps_out=29.9,
                     latency_ms_p50=212.0, latency_ms_p95=240.5, latency_ms_p99=260.1, jitter_ms=1.8,
                     frames_in=90000, frames_out=89960, dropped_in=12, dropped_out=52, deadline_misses=3, step_ms=9.6,
                     transport="shm"),
        SessionStats(session_id="aa3e59cf9caf", client="obs-filter", width=640, height=352, fps=60.0,
                     pixel_format="bgra", latency_frames=8, preset="anime", transport="net"),
    ]
    return StatusReply(daemon_version="0.1.0", model="wan2.1-1.3b", device="cuda:0", uptime_s=812.0, max_sessions=4,
                       control_address="tcp://127.0.0.1:5557", memory={"allocated_mb": 11876.0}, sessions=sessions)


@pytest.mark.parametrize("columns", [100, 200])
def test_the_status_table_is_never_cut_and_explains_its_columns(columns):
    console = Console(width=columns, record=True, color_system=None)
    console.print(status_table(_status()))
    text = console.export_text()
    assert "…" not in text
    for value in ("d53e59cf9caf", "sdlive-cam", "1280x720", "oil-painting", "212/240/260", "12/52", "90000/89960"):
        assert value in text, text
    assert max(len(line) for line in text.splitlines()) <= columns
    for term in ("late:", "step ms:", "via:", "drops in/out:"):
        assert term in " ".join(text.split()), text


def test_the_status_command_prints_the_table_uncut_when_piped(daemon):
    """`sdlive status | less` on a real daemon: rows and legend whole."""
    result = subprocess.run([sys.executable, "-c", "from sdlive.obs_bridge.cli import main; main()", "status",
                             "--address", daemon.control_address, "--timeout", "30"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout and "model tiny" in result.stdout
