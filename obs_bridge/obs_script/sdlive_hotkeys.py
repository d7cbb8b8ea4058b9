"""Preset hotkeys: one OBS frontend hotkey per preset plus next / previous (Settings → Hotkeys → "sdlive: …").

Registered at script load, from the preset files (sdlive_presets) and the presets the daemon listed last time (kept
in the script's settings). A preset's ``hotkey = "ctrl+shift+1"`` is its default binding, bound while the scene
collection has no saved binding for it; bindings are saved with the collection (``save``) and loaded back at the next
load. A hotkey switches every sdlive filter.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import obspython as obs
import sdlive_state as state
from sdlive_names import HOTKEY_NEXT, HOTKEY_PREFIX, HOTKEY_PREV, SCRIPT_SETTING_HOTKEYS, SCRIPT_SETTING_KNOWN_PRESETS
from sdlive_obs_api import info, warn

_MODIFIERS = {"ctrl": "control", "control": "control", "shift": "shift", "alt": "alt", "cmd": "command"}

_registered: dict[str, int] = {}  # hotkey name → id, for this script load


def key_combo_data(spec: str) -> list[dict[str, Any]]:
    """"ctrl+shift+1" → the obs_data form of one key combination (an element of obs_hotkey_load's array)."""
    combo: dict[str, Any] = {}
    for part in spec.lower().split("+"):
        part = part.strip()
        if part in _MODIFIERS:
            combo[_MODIFIERS[part]] = True
        elif part:
            combo["key"] = "OBS_KEY_" + part.upper()
    return [combo] if "key" in combo else []


def select_preset(name: str) -> None:
    info(f"hotkey: preset {name}")
    _for_each_instance(lambda inst: inst.select_preset(name))


def step_preset(delta: int) -> None:
    names = list(state.preset_names)
    if not names:
        return

    def step(inst: Any) -> None:
        current = inst.current_preset()
        i = names.index(current) if current in names else (-1 if delta > 0 else 0)
        inst.select_preset(names[(i + delta) % len(names)])

    _for_each_instance(step)


def _for_each_instance(fn: Callable[[Any], None]) -> None:
    for inst in state.all_instances():
        try:
            fn(inst)
        except Exception as exc:  # noqa: BLE001 - one broken filter must not stop the others
            warn(f"hotkey on '{inst.name}': {exc!r}")


def _known_presets(settings: Any) -> dict[str, str | None]:
    """The daemon's preset list as saved with the scene collection (name → default key)."""
    raw = obs.obs_data_get_string(settings, SCRIPT_SETTING_KNOWN_PRESETS)
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    if isinstance(doc, list):  # saved by an older script: names only
        return {str(n): None for n in doc}
    return {str(k): (str(v) if v else None) for k, v in doc.items()} if isinstance(doc, dict) else {}


def register(settings: Any, file_presets: dict[str, str | None]) -> None:
    """Register the hotkeys of ``file_presets`` and of the presets the daemon listed last time, with their saved
    bindings (or their default key)."""
    known = {**_known_presets(settings), **state.daemon_presets}  # this process's own list is the newer
    state.daemon_presets = known
    names = list(file_presets) + [n for n in known if n not in file_presets]
    if not state.preset_names:
        state.preset_names = names
    entries: list[tuple[str, str, Callable[[], None], str | None]] = [
        (HOTKEY_NEXT, "sdlive: next preset", lambda: step_preset(+1), None),
        (HOTKEY_PREV, "sdlive: previous preset", lambda: step_preset(-1), None),
    ]
    for name in names:
        entries.append((HOTKEY_PREFIX + name, f"sdlive: preset {name}", functools.partial(select_preset, name),
                        file_presets.get(name) or known.get(name)))
    saved = obs.obs_data_get_obj(settings, SCRIPT_SETTING_HOTKEYS)
    for hk_name, description, action, default_key in entries:
        def pressed(is_pressed: bool, action: Callable[[], None] = action) -> None:
            if is_pressed:
                action()

        hk_id = obs.obs_hotkey_register_frontend(hk_name, description, pressed)
        _registered[hk_name] = hk_id
        arr = obs.obs_data_get_array(saved, hk_name) if saved else None
        if arr is None and default_key:  # never bound in this collection: the preset file's key
            arr = obs.obs_data_array_create()
            for combo in key_combo_data(default_key):
                item = obs.obs_data_create_from_json(json.dumps(combo))
                obs.obs_data_array_push_back(arr, item)
                obs.obs_data_release(item)
        if arr is not None:
            obs.obs_hotkey_load(hk_id, arr)
            obs.obs_data_array_release(arr)
    if saved:
        obs.obs_data_release(saved)
    info(f"hotkeys registered: {', '.join(n for n, *_ in entries)}")


def save(settings: Any) -> None:
    """Store every binding, and the daemon's preset list, in the script's settings (script_save)."""
    saved = obs.obs_data_create()
    for hk_name, hk_id in _registered.items():
        arr = obs.obs_hotkey_save(hk_id)
        obs.obs_data_set_array(saved, hk_name, arr)
        obs.obs_data_array_release(arr)
    obs.obs_data_set_obj(settings, SCRIPT_SETTING_HOTKEYS, saved)
    obs.obs_data_release(saved)
    known = {name: state.daemon_presets.get(name) for name in state.preset_names}
    obs.obs_data_set_string(settings, SCRIPT_SETTING_KNOWN_PRESETS, json.dumps(known))


def names() -> list[str]:
    return sorted(_registered)


def unregister() -> None:
    """Forget this load's hotkeys. OBS unregisters a script's hotkeys itself when it unloads the script (before
    ``script_unload``); obspython's ``obs_hotkey_unregister`` takes the callback, not an id, and raises "No active
    script" outside a script call, so it is not called here."""
    _registered.clear()
