"""The wire contract, loaded by path: ``daemon/protocol/constants.py`` (versions, addresses, timing, parameter
bounds, pixel formats) and ``ring.py`` (the shared-memory frame ring).

Both files are stdlib only. They are loaded as the submodules of a synthetic package, so ``ring.py``'s relative
``from .constants import …`` works, while ``daemon/protocol/__init__.py`` (pydantic, which OBS's Python lacks) never
runs. The folder holding them is, first found:

1. ``$SDLIVE_PROTOCOL_DIR``;
2. ``<script dir>/sdlive_protocol/``: the copy the installer puts beside the script;
3. ``daemon/protocol/`` of the source checkout this script folder lives in (``obs_bridge/obs_script/``).

The package is loaded once per OBS process and kept across script reloads (open rings were made by it).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

from sdlive_names import ENV_PROTOCOL_DIR, PROTOCOL_DIR_NAME

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "_sdlive_protocol"  # the synthetic package's name in sys.modules
FILES = ("constants", "ring")


def protocol_dir_candidates() -> list[str]:
    """The folders searched for constants.py and ring.py, in order."""
    paths = []
    override = os.environ.get(ENV_PROTOCOL_DIR)
    if override:
        paths.append(override)
    paths.append(os.path.join(SCRIPT_DIR, PROTOCOL_DIR_NAME))
    paths.append(os.path.join(SCRIPT_DIR, os.pardir, os.pardir, "daemon", "protocol"))
    return [os.path.normpath(p) for p in paths]


def load_protocol(candidates: list[str] | None = None) -> types.ModuleType:
    """Load the synthetic package (its ``constants`` and ``ring`` submodules) from the first folder holding both;
    raises ImportError naming every folder tried and the fix."""
    tried = []
    for folder in protocol_dir_candidates() if candidates is None else candidates:
        missing = [f"{name}.py" for name in FILES if not os.path.isfile(os.path.join(folder, f"{name}.py"))]
        if missing:
            tried.append(f"{folder} (no {', '.join(missing)})")
            continue
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [folder]
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        try:
            for name in FILES:
                setattr(package, name, importlib.import_module(f"{PACKAGE}.{name}"))
        except BaseException:
            for key in [PACKAGE, *(f"{PACKAGE}.{name}" for name in FILES)]:
                sys.modules.pop(key, None)
            raise
        return package
    raise ImportError(
        "sdlive: the wire contract (constants.py and ring.py) was not found; tried " + "; ".join(tried)
        + f". Re-run `sdlive obs install` (it copies them to <script dir>/{PROTOCOL_DIR_NAME}/) or set "
        f"{ENV_PROTOCOL_DIR} to a folder holding them."
    )


_package = sys.modules.get(PACKAGE) or load_protocol()
constants: types.ModuleType = _package.constants
ring: types.ModuleType = _package.ring
PROTOCOL_DIR: str = list(_package.__path__)[0]
