"""`sdlive obs setup|preset|status` against a real OBS: the filter is added, presets switch through the script's
hotkeys, status reports the filters; bad input and a missing OBS are clear errors with a non-zero exit."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sdlive.obs_bridge.cli import app

from .conftest import SOURCE_NAME, start_obs
from .harness import free_port

pytestmark = [pytest.mark.obs, pytest.mark.slow]
runner = CliRunner()


@pytest.fixture(scope="module")
def obs(tmp_path_factory):
    o = start_obs(tmp_path_factory)
    o.add_color_source()
    yield o
    o.stop()


def sdlive(obs, *args: str):
    return runner.invoke(app, ["obs", *args, "--port", str(obs.obs.ws_port)])


def test_setup_without_source_lists_the_sources_and_fails(obs):
    r = sdlive(obs, "setup")
    assert r.exit_code == 1
    assert "pass --source NAME" in r.output and SOURCE_NAME in r.output


def test_setup_unknown_source_names_the_known_ones(obs):
    r = sdlive(obs, "setup", "--source", "nope")
    assert r.exit_code == 1
    assert "no source named 'nope'" in r.output and SOURCE_NAME in r.output


def test_setup_adds_the_filter_with_the_daemon_address_and_is_idempotent(obs):
    r = sdlive(obs, "setup", "--source", SOURCE_NAME, "--daemon", "tcp://127.0.0.1:6001", "--preset", "anime")
    assert r.exit_code == 0, r.output
    assert "OBS 29" in r.output or "OBS 3" in r.output
    assert f"added filter 'sdlive' to '{SOURCE_NAME}'" in r.output
    f = obs.client.get_source_filter(SOURCE_NAME, "sdlive")
    assert f.filter_kind == "sdlive_filter"
    assert f.filter_settings["daemon_address"] == "tcp://127.0.0.1:6001"
    assert f.filter_settings["preset"] == "anime"
    r = sdlive(obs, "setup", "--source", SOURCE_NAME, "--daemon", "tcp://127.0.0.1:6002")
    assert r.exit_code == 0 and "updated filter 'sdlive'" in r.output
    assert len(obs.client.get_source_filter_list(SOURCE_NAME).filters) == 1


def test_status_reports_versions_script_and_filters_as_json(obs):
    r = sdlive(obs, "status", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["script_loaded"] is True
    assert "anime" in doc["presets"] and "next" not in doc["presets"] and "prev" not in doc["presets"]
    text = sdlive(obs, "status").output
    assert "preset hotkeys: anime" in text and "; and next / prev" in text
    assert [(f["source"], f["filter"]) for f in doc["filters"]] == [(SOURCE_NAME, "sdlive")]
    assert doc["versions"]["obs_version"].startswith(("29", "3"))


def test_preset_presses_the_hotkey_and_the_filter_follows(obs):
    r = sdlive(obs, "preset", "watercolor")
    assert r.exit_code == 0, r.output
    assert "sdlive.preset.watercolor" in r.output
    obs.wait_for(lambda: obs.client.get_source_filter(SOURCE_NAME, "sdlive").filter_settings.get("preset")
                 == "watercolor", 5, "the filter's preset setting to follow the hotkey")
    r = sdlive(obs, "preset", "next")
    assert r.exit_code == 0
    obs.wait_for(lambda: obs.client.get_source_filter(SOURCE_NAME, "sdlive").filter_settings.get("preset")
                 == "anime", 5, "'next' to wrap around to the first preset")


def test_unknown_preset_lists_the_known_ones(obs):
    r = sdlive(obs, "preset", "no-such-style")
    assert r.exit_code == 1
    assert "no hotkey for preset 'no-such-style'" in r.output and "watercolor" in r.output
    listed = r.output.split("OBS has presets", 1)[1].split("(and next, prev)")[0]
    assert "next" not in listed and "prev" not in listed


def test_obs_not_running_is_a_clear_error():
    r = runner.invoke(app, ["obs", "status", "--port", str(free_port())])
    assert r.exit_code == 1
    assert "did not answer" in r.output and "WebSocket" in r.output
