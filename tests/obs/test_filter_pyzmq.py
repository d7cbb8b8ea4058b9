"""The same filter with pyzmq available inside OBS's Python (Debian: apt-get install python3-zmq; elsewhere the
installer's private site folder): control goes over a pyzmq DEALER, frames still over the shared-memory rings."""

from __future__ import annotations

import pytest

from .conftest import SOURCE_NAME, distance_to_source, start_obs

pytestmark = [pytest.mark.obs, pytest.mark.slow]


@pytest.fixture(scope="module")
def obs(tmp_path_factory, obs_daemon):
    # OBS's embedded Python takes its home from the `python3` first on PATH: on a streamer's Debian box that is
    # /usr/bin/python3 (system site-packages, python3-zmq); in a dev shell it may be a pyenv shim without them.
    o = start_obs(tmp_path_factory, SDLIVE_OBS_CONTROL="pyzmq", PATH="/usr/local/bin:/usr/bin:/bin")
    try:
        stats = o.wait_for(lambda: o.stats(), 10, "the script's first stats file")
        if not stats.get("pyzmq"):
            pytest.skip("pyzmq is not importable in OBS's Python (Debian: apt-get install python3-zmq)")
        o.add_color_source()
        o.client.create_source_filter(SOURCE_NAME, "sdlive", "sdlive_filter",
                                      {"daemon_address": obs_daemon.control_address})
        yield o
    finally:
        o.stop()


def test_pyzmq_control_opens_a_session_and_the_output_is_styled(obs, obs_daemon):
    f = obs.wait_for(lambda: (s := obs.filter_stats()).get("state") == "connected" and s.get("frames_out") and s,
                     60, "a session over pyzmq")
    assert f["control"] == "pyzmq"
    assert f["session_id"] in {s["session_id"] for s in obs_daemon.sessions()}
    obs.wait_for(lambda: distance_to_source(obs.screenshot()) > 12.0, 30, "styled output")


def test_pyzmq_preset_hotkey_reaches_the_daemon(obs, obs_daemon):
    f = obs.wait_for(lambda: (s := obs.filter_stats()).get("state") == "connected" and s, 30, "a connected filter")
    presets = [p["name"] for p in obs_daemon.request("list_presets")["presets"]]
    target = presets[1]
    obs.client.trigger_hotkey_by_name(f"sdlive.preset.{target}")

    def preset():
        return next((s.get("preset") for s in obs_daemon.sessions() if s["session_id"] == f["session_id"]), None)

    obs.wait_for(lambda: preset() == target, 10, f"the daemon's session preset to become {target!r}")
