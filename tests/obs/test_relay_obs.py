"""Dual-PC from OBS (issue 16): a real OBS whose sdlive filter talks to `sdlive relay`, which carries the frames to
a second daemon (the "GPU box", with a token) over the network; both PCs' ports live on loopback here. The filter
needs nothing but the relay's address: styled frames come back, the preset hotkeys reach the remote session, and
each side's stats show its half."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sdlive.obs_bridge.client import DaemonClient, DaemonUnavailable

from .conftest import distance_to_source, start_obs
from .harness import RestartableDaemon, free_port

pytestmark = [pytest.mark.obs, pytest.mark.slow]

TOKEN = "obs-relay-test-token-0123456789"
STYLED = 12.0  # mean |screenshot - source colour| above this: not the source


class _TokenDaemon(RestartableDaemon):
    def start(self) -> None:
        self.starts += 1
        self.proc = self.launch(self.workdir / f"run{self.starts}", control=self.control_address,
                                pub=self.pub_address, token=TOKEN)  # fmt: skip


@pytest.fixture(scope="module")
def gpu_box(tmp_path_factory, launch_daemon):
    d = _TokenDaemon(launch_daemon, tmp_path_factory.mktemp("gpu-box"))
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, gpu_box):
    home = tmp_path_factory.mktemp("relay")
    control, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    log_path = home / "relay.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CONFIG_HOME": str(home / "config")}
    env.pop("SDLIVE_TOKEN", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from sdlive.obs_bridge.cli import main; main()", "relay",
             "--daemon", gpu_box.control_address, "--token", TOKEN, "--no-ui", "--control", control, "--pub", pub,
             "--preset-mirror", str(home / "mirror")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    with DaemonClient(control, timeout_s=2.0) as client:
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if client.hello().state == "ready":
                    break
            except DaemonUnavailable:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
    yield control
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def obs(tmp_path_factory, relay):
    o = start_obs(tmp_path_factory)
    o.add_color_source()
    o.add_filter(relay)
    yield o
    o.stop()


def _relayed(gpu_box) -> list[dict]:
    with DaemonClient(gpu_box.control_address, token=TOKEN, timeout_s=10) as client:
        return [s.model_dump() for s in client.status().sessions if s.client == "sdlive-relay"]


def test_obs_through_the_relay_shows_the_remote_daemons_output(obs, relay, gpu_box):
    f = obs.wait_for(lambda: (s := obs.filter_stats()).get("frames_out", 0) > 0 and s, 90,
                     "the filter's session (through the relay) to deliver output frames")  # fmt: skip
    assert obs.wait_for(lambda: distance_to_source(obs.screenshot()) > STYLED, 30, "a styled screenshot")
    [remote] = _relayed(gpu_box)
    assert remote["transport"] == "net" and remote["frames_in"] > 0 and remote["frames_out"] > 0
    with DaemonClient(relay, timeout_s=10) as client:
        [local] = client.status().sessions
    assert local.session_id == f["session_id"] and local.transport == "shm"
    assert local.frames_out > 0


def test_preset_hotkeys_reach_the_remote_session(obs, gpu_box):
    with DaemonClient(gpu_box.control_address, token=TOKEN, timeout_s=10) as client:
        presets = {p.name: p.prompt for p in client.list_presets().presets}
    target = sorted(presets)[-1]
    obs.client.trigger_hotkey_by_name(f"sdlive.preset.{target}")
    obs.wait_for(lambda: (r := _relayed(gpu_box)) and r[0]["params"]["prompt"] == presets[target], 30,
                 f"the remote session's prompt to become {target!r}'s")  # fmt: skip
