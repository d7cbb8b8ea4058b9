"""Preset hotkey bindings: a preset file's default key is bound on first run, bindings are saved with the scene
collection (obs_hotkey_save in script_save) and a binding changed there is loaded on the next start
(obs_hotkey_load): pressing that key sequence switches the filter's preset."""

from __future__ import annotations

import json

import pytest

from .conftest import CANVAS, SOURCE_NAME, ObsUnderTest
from .harness import SCRIPT, HeadlessOBS

pytestmark = [pytest.mark.obs, pytest.mark.slow]


def _script_settings(collection) -> dict:
    doc = json.loads(collection.read_text())
    entry = next(e for e in doc["modules"]["scripts-tool"] if e["path"] == str(SCRIPT))
    return entry["settings"]


def test_bindings_are_saved_and_a_changed_binding_is_loaded_on_the_next_start(tmp_path):
    home = tmp_path / "home"
    o = ObsUnderTest(home, {})
    o.start()
    o.add_color_source()
    o.add_filter("tcp://127.0.0.1:9")  # no daemon there: the bindings need none
    assert o.stop() == 0
    collection = o.obs.config_dir / "basic" / "scenes" / "sdlive.json"
    saved = _script_settings(collection)["sdlive_hotkeys"]
    # presets/anime.toml says hotkey = "ctrl+shift+1": bound on first run, then saved
    assert saved["sdlive.preset.anime"] == [{"key": "OBS_KEY_1", "control": True, "shift": True}]
    assert saved["sdlive.preset.next"] == []
    # the streamer binds "watercolor" to F14 (what Settings → Hotkeys stores through script_save)
    doc = json.loads(collection.read_text())
    for entry in doc["modules"]["scripts-tool"]:
        if entry["path"] == str(SCRIPT):
            entry["settings"]["sdlive_hotkeys"]["sdlive.preset.watercolor"] = [{"key": "OBS_KEY_F14"}]
    collection.write_text(json.dumps(doc))

    o2 = ObsUnderTest(home, {})
    o2.obs = HeadlessOBS(home, width=CANVAS[0], height=CANVAS[1], scripts=[SCRIPT], ws_port=o.obs.ws_port)
    o2.start()
    try:
        def preset():
            return o2.client.get_source_filter(SOURCE_NAME, "sdlive").filter_settings.get("preset")

        o2.client.trigger_hotkey_by_key_sequence("OBS_KEY_F14", False, False, False, False)
        o2.wait_for(lambda: preset() == "watercolor", 5, "F14 (loaded binding) to select watercolor")
        o2.client.trigger_hotkey_by_key_sequence("OBS_KEY_1", True, True, False, False)  # shift, ctrl
        o2.wait_for(lambda: preset() == "anime", 5, "ctrl+shift+1 (default binding) to select anime")
    finally:
        assert o2.stop() == 0
