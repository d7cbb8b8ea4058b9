"""The preset files the script reads at load, before any daemon answers: names and default hotkeys.

Preset hotkeys must be registered when the script loads (OBS restores their bindings then), which may be long before
a daemon runs. So the script reads the shipped preset files itself: the copy the installer puts beside the script,
or the ``presets/`` folder of the source checkout. Every other preset (the user's own, a daemon's ``--preset-dir``)
the daemon reports through ``list_presets`` once a filter connects; the script keeps that list in its settings for
the next load (sdlive_hotkeys). The files are TOML, read with the stdlib ``tomllib`` (Python 3.11+). No OBS imports.
"""

from __future__ import annotations

import os
import sys
import types

from sdlive_names import PRESETS_DIR_NAME

tomllib: types.ModuleType | None
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (OBS on Windows/macOS may embed it)
    tomllib = None

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
PRESET_SUFFIX = ".toml"


def preset_dirs() -> list[str]:
    """The installed copy beside the script, then the source checkout's ``presets/``; a later one wins by name."""
    return [
        os.path.normpath(os.path.join(SCRIPT_DIR, PRESETS_DIR_NAME)),
        os.path.normpath(os.path.join(SCRIPT_DIR, os.pardir, os.pardir, PRESETS_DIR_NAME)),
    ]


def read_preset_files(dirs: list[str] | None = None) -> tuple[dict[str, str | None], list[str]]:
    """(name → default hotkey such as "ctrl+shift+1" or None, problems). A file that cannot be read or parsed is a
    problem and is skipped; the name defaults to the file name, as in the daemon."""
    if tomllib is None:
        return {}, [
            f"Python {sys.version.split()[0]} has no tomllib (3.11+): preset hotkeys appear once a filter has "
            "connected to the daemon and OBS has saved the scene collection; or set a Python 3.11+ in Tools → "
            "Scripts → Python Settings"
        ]
    found: dict[str, str | None] = {}
    problems: list[str] = []
    for folder in preset_dirs() if dirs is None else dirs:
        if not os.path.isdir(folder):
            continue
        for file_name in sorted(os.listdir(folder)):
            if not file_name.endswith(PRESET_SUFFIX):
                continue
            path = os.path.join(folder, file_name)
            try:
                with open(path, "rb") as fh:
                    doc = tomllib.load(fh)
            except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
                problems.append(f"{path}: {exc}")
                continue
            name = doc.get("name", file_name[: -len(PRESET_SUFFIX)])
            hotkey = doc.get("hotkey")
            if not isinstance(name, str) or not name:
                problems.append(f"{path}: name must be a non-empty string")
                continue
            found[name] = hotkey if isinstance(hotkey, str) and hotkey else None
    return found, problems
