"""Auto-started daemons, one rule for every command, as a user runs them: `cam` starts a daemon at the configured
address (SDLIVE_CONTROL/SDLIVE_PUB) and says which model it runs; a `render` started meanwhile reuses it; when
`cam` quits while `render` still runs (cam is given --model tiny: the model probe, which imports torch, is
tested in test_media_cli_errors), the daemon is left running for `render` (and cam says so), and `render`
finishes its file. A preset file added meanwhile is listed and used without a restart."""

from __future__ import annotations

import os
import subprocess

import pytest

from sdlive.obs_bridge.client import DaemonClient, DaemonError


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clients(address: str) -> list[str]:
    try:
        with DaemonClient(address, timeout_s=2.0) as dc:
            return [s.client or "" for s in dc.status().sessions]
    except DaemonError:
        return []


@pytest.mark.slow
def test_render_reuses_the_daemon_cam_started_and_outlives_cam(tmp_path, media, sdlive_command, wait_for):
    control, pub = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "SDLIVE_CONTROL": control, "SDLIVE_PUB": pub, "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("SDLIVE_CONFIG", None)
    user_presets = tmp_path / "config" / "sdlive" / "presets"  # the user's preset folder, empty at the start
    user_presets.mkdir(parents=True)
    clip = media.make_clip(tmp_path / "clip.mp4", frames=20, fps=10, width=96, height=54)
    cam = subprocess.Popen(sdlive_command("cam", "--input", "synthetic", "--width", "64", "--height", "64",
                                          "--output", "none", "--model", "tiny"),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    render = None
    try:
        assert wait_for(lambda: "sdlive-cam" in _clients(control), 150), "cam did not start a daemon at SDLIVE_CONTROL"
        # a preset file written while the daemon runs is listed (with its hotkey's number) and usable at once
        (user_presets / "my-look.toml").write_text('name = "my-look"\nprompt = "a chalk drawing"\nhotkey = "ctrl+shift+9"\n')

        def listed() -> str:
            return subprocess.run(sdlive_command("preset"), capture_output=True, text=True, env=env, timeout=60).stdout

        assert wait_for(lambda: " 9  my-look" in listed(), 20), listed()
        render = subprocess.Popen(sdlive_command("render", str(clip), "-o", str(tmp_path / "out.mp4"),
                                                 "--preset", "my-look", "--live"),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert wait_for(lambda: "sdlive-render" in _clients(control), 60), "render did not open a session"
        cam.stdin.write("q\n")
        cam.stdin.flush()
        cam_out, _ = cam.communicate(timeout=60)
        render_out, _ = render.communicate(timeout=120)
        with DaemonClient(control, timeout_s=5.0) as dc:
            assert dc.hello().pid  # still running after both
    finally:
        for proc in (cam, render):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        try:
            with DaemonClient(control, timeout_s=5.0) as dc:
                dc.shutdown()
        except DaemonError:
            pass
    cam_log, render_log = " ".join(cam_out.split()), " ".join(render_out.split())
    assert cam.returncode == 0, cam_out
    assert f"local daemon at {control}: model tiny on cpu" in cam_log, cam_out  # where configured, says which model
    assert f"the local daemon at {control} keeps running: 1 session(s) of other clients use it" in cam_log, cam_out
    assert render.returncode == 0, render_out
    assert f"using the daemon at {control}: model tiny" in render_log, render_out
    assert "wrote" in render_log and "20 frames" in render_log, render_out
    # 96x54 rounds to 96x48 for the session and back to 96x54 for the file
    assert "96x54 is restyled at 96x48" in render_log, render_out
    stream = media.video_stream(media.probe(tmp_path / "out.mp4"))
    assert (stream["width"], stream["height"], int(stream["nb_read_frames"])) == (96, 54, 20)
