"""The filter's life in a real OBS: preset hotkeys in quick succession, sources whose size the daemon does not take,
holding the last styled frame while the daemon is away, the script unloaded and loaded again with the filter in use
(a scene-collection switch), and a clean shutdown (OBS quit as a user quits it, by closing its window) that leaks
nothing more than OBS without the script."""

from __future__ import annotations

import re
import time

import pytest

from .conftest import SOURCE_NAME, ObsUnderTest, distance_to_source, start_obs

pytestmark = [pytest.mark.obs, pytest.mark.slow]

STYLED = 12.0
PASSTHROUGH = 3.0
ODD_SIZE = (320, 180)  # 180 is not a multiple of 16


def leak_count(log: str) -> int:
    counts = [int(m) for m in re.findall(r"Number of memory leaks: (\d+)", log)]
    assert counts, "OBS logged no leak report (did it quit cleanly, by closing its window or SIGINT?)"
    return counts[-1]


@pytest.fixture(scope="module")
def baseline_leaks(tmp_path_factory) -> int:
    """OBS without the sdlive script, same scene and the same scene-collection switch (OBS 29 itself leaks one
    allocation per switch): its own leak count at shutdown on this build."""
    home = tmp_path_factory.mktemp("obs-baseline")
    o = ObsUnderTest(home, {})
    o.obs.scripts = []
    o.start()
    o.add_color_source()
    o.client.create_scene_collection("other")
    o.client.set_current_scene_collection("sdlive")
    o.wait_for(lambda: o.client.get_scene_collection_list().current_scene_collection_name == "sdlive", 10,
               "OBS to switch back to the sdlive collection")
    assert o.stop() == 0
    return leak_count(o.obs.log_text())


@pytest.fixture(scope="module")
def obs(tmp_path_factory, obs_daemon, baseline_leaks):
    o = start_obs(tmp_path_factory, obs_daemon)
    yield o
    o.stop()


def _connected(obs, name="sdlive"):
    f = obs.filter_stats(name)
    return f if f.get("state") == "connected" and f.get("frames_out", 0) > 0 else None


def _session_preset(obs_daemon, session_id):
    for s in obs_daemon.sessions():
        if s["session_id"] == session_id:
            return s.get("preset")
    return None


def test_quick_preset_hotkeys_end_on_the_last_and_every_request_is_answered(obs, obs_daemon):
    """The daemon's IO thread answers set_preset at once, however busy the model is: keys pressed in quick
    succession while frames stream all get their reply (no "got no reply" in the log), and the last one wins."""
    f = obs.wait_for(lambda: _connected(obs), 60, "a connected filter")
    presets = [p["name"] for p in obs_daemon.request("list_presets")["presets"]]
    for name in presets[1:4]:
        obs.client.trigger_hotkey_by_name(f"sdlive.preset.{name}")
    target = presets[3]
    obs.wait_for(lambda: _session_preset(obs_daemon, f["session_id"]) == target, 10,
                 f"the daemon's session preset to end on {target!r}")
    obs.wait_for(lambda: f"set_preset {{'name': '{target}'}} accepted" in obs.sdlive_log(), 5,
                 "the filter to log the daemon's reply")
    assert "got no reply" not in obs.sdlive_log()


def test_a_source_size_the_daemon_refuses_is_scaled_to_multiples_of_16(obs, obs_daemon):
    obs.add_color_source("odd", size=ODD_SIZE)
    obs.add_filter(obs_daemon.control_address, "odd", "sdlive-odd")
    try:
        f = obs.wait_for(lambda: _connected(obs, "sdlive-odd"), 60, "the odd-sized source's session")
        assert f["size"] == [320, 176]
        assert f["session_id"] in {s["session_id"] for s in obs_daemon.sessions()}
        shot = obs.screenshot("odd", ODD_SIZE)
        assert shot.shape[:2] == (ODD_SIZE[1], ODD_SIZE[0])
        obs.wait_for(lambda: distance_to_source(obs.screenshot("odd", ODD_SIZE)) > STYLED, 30,
                     "styled output stretched over the whole odd-sized source")
    finally:
        obs.client.remove_input("odd")
    obs.wait_for(lambda: not obs.filter_stats("sdlive-odd"), 10, "the removed source's filter to be destroyed")


BAD_ADDRESSES = {"typo": "localhost:7557", "nohost": "tcp://no-such-host.invalid:5557",
                 "refused": "tcp://127.0.0.1:1"}


def test_a_bad_address_is_one_clear_log_line_then_quiet_and_the_source_passes_through(obs):
    bad = {**BAD_ADDRESSES, "notdaemon": f"tcp://127.0.0.1:{obs.obs.ws_port}"}  # OBS's websocket: not ZMTP
    for name, address in bad.items():
        obs.add_color_source(name)
        obs.add_filter(address, name, f"sdlive-{name}")
    try:
        time.sleep(7.0)  # several reconnect intervals (2 s at most between tries)
        lines = obs.sdlive_log_lines()
        for name, address in bad.items():
            said = [ln for ln in lines if f"filter 'sdlive-{name}'" in ln and "address=" not in ln
                    and "created" not in ln]
            assert len(said) == 1, f"{address!r}: expected one line, got {len(said)}:\n" + "\n".join(said)
            assert distance_to_source(obs.screenshot(name)) < PASSTHROUGH
        typo = next(ln for ln in lines if "filter 'sdlive-typo'" in ln and "tcp://HOST:PORT" in ln)
        assert "localhost:7557" in typo
    finally:
        for name in bad:
            obs.client.remove_input(name)


def test_a_full_daemon_is_one_line_naming_max_sessions(obs, tmp_path, launch_daemon):
    small = launch_daemon(tmp_path / "small", env={"SDLIVE_MAX_SESSIONS": "1"})
    try:
        for name in ("one", "two"):
            obs.add_color_source(name)
            obs.add_filter(small.control_address, name, f"sdlive-{name}")
        # Whichever filter's open reaches the daemon second (the first one, under load) finds it full.
        def refused() -> str | None:
            return next((name for name in ("one", "two") for ln in obs.sdlive_log_lines()
                         if f"filter 'sdlive-{name}': the daemon has no free session" in ln), None)

        full = obs.wait_for(refused, 30, "one filter to report the full daemon")
        served = "two" if full == "one" else "one"
        time.sleep(3.0)  # a few retries
        lines = [ln for ln in obs.sdlive_log_lines() if f"filter 'sdlive-{full}': the daemon has no free" in ln]
        assert len(lines) == 1 and "max_sessions" in lines[0], lines
        assert not any(f"filter 'sdlive-{served}': the daemon has no free" in ln for ln in obs.sdlive_log_lines())
        assert obs.filter_stats(f"sdlive-{served}").get("state") == "connected"
    finally:
        for name in ("one", "two"):
            obs.client.remove_input(name)
        small.stop()


def test_last_output_is_held_while_the_daemon_is_away(obs, obs_daemon):
    obs.wait_for(lambda: _connected(obs), 30, "a connected filter")
    obs.client.set_source_filter_settings(SOURCE_NAME, "sdlive", {"when_away": "last_output"}, True)
    obs.wait_for(lambda: distance_to_source(obs.screenshot()) > STYLED, 30, "styled output")
    obs_daemon.kill()
    obs.wait_for(lambda: obs.filter_stats().get("state") == "disconnected", 15, "the filter to notice")
    for _ in range(5):
        assert distance_to_source(obs.screenshot()) > STYLED, "the last styled frame was not held"
        time.sleep(0.1)
    obs.client.set_source_filter_settings(SOURCE_NAME, "sdlive", {"when_away": "passthrough"}, True)
    obs.wait_for(lambda: distance_to_source(obs.screenshot()) < PASSTHROUGH, 5, "passthrough once asked for")
    obs_daemon.start()
    obs.wait_for(lambda: _connected(obs), 60, "the filter to reconnect")


def test_script_unload_and_reload_with_the_filter_in_use_keeps_obs_alive(obs, obs_daemon):
    """A scene-collection switch unloads every script (while our filter instance still exists: OBS destroys the
    sources afterwards) and switching back loads it again in the same process: the registration guard, the
    process-lifetime callbacks and the new filter instance are all exercised."""
    obs.wait_for(lambda: _connected(obs), 60, "a connected filter")
    obs.client.create_scene_collection("other")
    obs.wait_for(lambda: not any(n.startswith("sdlive.") for n in obs.client.get_hotkey_list().hotkeys), 15,
                 "the script to unload with its collection")
    obs.wait_for(lambda: not obs_daemon.sessions(), 15, "the destroyed filter to close its daemon session")
    obs.client.set_current_scene_collection("sdlive")
    obs.wait_for(lambda: any(n.startswith("sdlive.") for n in obs.client.get_hotkey_list().hotkeys), 15,
                 "the script to load again")
    obs.wait_for(lambda: _connected(obs), 60, "the filter (restored from the collection) to reconnect")
    obs.wait_for(lambda: distance_to_source(obs.screenshot()) > STYLED, 30, "styled output after the reload")
    log = obs.sdlive_log()
    assert "already registered in this OBS process" in log
    assert obs.obs.proc.poll() is None


def test_quitting_obs_is_clean_and_leaks_no_more_than_obs_alone(obs, baseline_leaks):
    obs.wait_for(lambda: _connected(obs), 60, "a connected filter")
    rc = obs.stop()
    assert rc == 0
    log = obs.obs.log_text()
    assert "Traceback" not in log
    assert "filter 'sdlive' destroyed" in log
    assert leak_count(log) <= baseline_leaks
