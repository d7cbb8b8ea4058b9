"""The names the sdlive OBS script gives things in OBS, defined once.

The script registers them inside OBS; the tools that drive OBS from outside (``sdlive obs …`` through
obs-websocket, the installer, the tests) use the same names. Stdlib only and free of OBS imports, so
``sdlive.obs_bridge.obsws_tools`` and ``obs_setup`` load this file by path.
"""

from __future__ import annotations

# The filter: libobs source id and the name OBS shows in the filter list.
FILTER_ID = "sdlive_filter"
FILTER_DISPLAY_NAME = "sdlive"

# The filter's settings keys (obs_data), as stored in the scene collection and set by `sdlive obs setup`.
SETTING_ADDRESS = "daemon_address"
SETTING_TOKEN = "token"
SETTING_PRESET = "preset"
SETTING_STEPS = "steps"
SETTING_STRENGTH = "strength"
SETTING_WHEN_AWAY = "when_away"

# Values of SETTING_WHEN_AWAY: what the filter draws while no daemon session is open.
AWAY_PASSTHROUGH = "passthrough"
AWAY_LAST_OUTPUT = "last_output"

# Frontend hotkeys: one per preset (HOTKEY_PREFIX + name) plus next / previous.
HOTKEY_PREFIX = "sdlive.preset."
HOTKEY_NEXT = HOTKEY_PREFIX + "next"
HOTKEY_PREV = HOTKEY_PREFIX + "prev"

# The script's own settings (saved with the scene collection under modules.scripts-tool).
SCRIPT_SETTING_HOTKEYS = "sdlive_hotkeys"  # the hotkey bindings, per hotkey name
SCRIPT_SETTING_KNOWN_PRESETS = "sdlive_known_presets"  # preset name → default key, as the daemon last listed them

# Files: the entry file OBS loads (Tools → Scripts), and the folders beside it.
ENTRY_FILE = "sdlive_filter.py"
PROTOCOL_DIR_NAME = "sdlive_protocol"  # the installed copy of daemon/protocol/{constants,ring}.py
PRESETS_DIR_NAME = "presets"  # the installed copy of the shipped preset files (hotkey names before any daemon)

# Environment switches.
ENV_STATS = "SDLIVE_OBS_STATS"  # path of a JSON file the script rewrites twice a second (bench, tests)
ENV_PROTOCOL_DIR = "SDLIVE_PROTOCOL_DIR"  # a folder holding constants.py and ring.py: overrides the search
