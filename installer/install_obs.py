#!/usr/bin/env python3
"""Install the sdlive OBS script into OBS (Linux, Windows, macOS). Any Python >= 3.10; stdlib only.

    python installer/install_obs.py [--websocket] [--collection NAME|current|all] [--models NAME]
                                    [--obs-config DIR] [--uninstall] [--dry-run] [--force]

Copies the script folder's files (obs_bridge/obs_script/sdlive_*.py) side by side to <OBS config>/sdlive/, the wire
contract it loads by path (daemon/protocol/constants.py and ring.py) to <OBS config>/sdlive/sdlive_protocol/ and the
preset files to <OBS config>/sdlive/presets/; lists the entry file sdlive_filter.py in the scene collection's Tools →
Scripts (modules.scripts-tool); enables obs-websocket if asked (global.ini for OBS 29 and
plugin_config/obs-websocket/config.json for OBS 30+). The script needs no package beyond OBS's own Python.
Idempotent; --uninstall reverses it. Close OBS first: it rewrites its scene collection when it exits.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SETUP = Path(__file__).resolve().parents[1] / "obs_bridge" / "obs_setup.py"


def _load_setup():
    if SETUP.is_file():  # a source checkout: no need for sdlive to be installed
        spec = importlib.util.spec_from_file_location("sdlive_obs_setup", SETUP)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from sdlive.obs_bridge import obs_setup  # an installed package

    return obs_setup


if __name__ == "__main__":
    sys.exit(_load_setup().install_main(sys.argv[1:]))
