"""sdlive OBS script: the "sdlive" video filter and its preset hotkeys (Tools → Scripts → + → this file).

This is the file OBS loads; its siblings in this folder each do one job:

- ``sdlive_names``     the names the filter has in OBS (id, settings keys, hotkeys), shared with the CLI
- ``sdlive_contract``  the wire contract (daemon/protocol constants.py and ring.py), loaded by path
- ``sdlive_obs_api``   libobs through ctypes
- ``sdlive_settings``  the filter's settings: defaults, properties dialog, reading them
- ``sdlive_control``   the ZMTP client that talks to the daemon's control socket
- ``sdlive_link``      one filter's worker thread: session, heartbeats, reconnects, preset/parameter changes
- ``sdlive_render``    the graphics-thread side: capture into the input ring, upload from the output ring
- ``sdlive_instance``  one filter instance, tying the above together
- ``sdlive_presets``   preset files read at load (names, default keys)
- ``sdlive_hotkeys``   the preset hotkeys
- ``sdlive_stats``     the optional stats file (bench, tests)
- ``sdlive_state``     what outlives a script reload

It runs inside OBS's own Python (Debian: the system python3; Windows/macOS: the CPython set in Tools → Scripts →
Python Settings) with the standard library only. OBS puts this folder on ``sys.path``, so the siblings import as
top-level modules (hence their ``sdlive_`` prefix). ``obspython`` has no ``obs_register_source``: the filter is
registered by filling the leading fields of libobs' ``struct obs_source_info`` and calling ``obs_register_source_s``
through ctypes (DESIGN §5), once per OBS process.
"""

from __future__ import annotations

import os
import sys

# A reload (Tools → Scripts → reload) re-runs this file: take fresh copies of the siblings too, except the state
# that must outlive it. Filter instances created before keep the code they were made with.
_SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
for _file in os.listdir(_SCRIPT_DIR):
    _module = _file[:-3]
    if _file.startswith("sdlive_") and _file.endswith(".py") and _module not in (__name__, "sdlive_state"):
        sys.modules.pop(_module, None)

import atexit  # noqa: E402
import ctypes  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import obspython as obs  # noqa: E402
import sdlive_hotkeys  # noqa: E402
import sdlive_presets  # noqa: E402
import sdlive_settings  # noqa: E402
import sdlive_state as state  # noqa: E402
from sdlive_contract import PROTOCOL_DIR, constants  # noqa: E402
from sdlive_instance import FilterInstance  # noqa: E402
from sdlive_names import ENV_STATS, FILTER_ID  # noqa: E402
from sdlive_obs_api import (  # noqa: E402
    CREATE,
    DESTROY,
    GET_DEFAULTS,
    GET_NAME,
    GET_PROPERTIES,
    SIGNAL_CALLBACK,
    UPDATE,
    VIDEO_RENDER,
    SourceInfo,
    info,
    lib,
    warn,
)
from sdlive_stats import StatsWriter  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# C callbacks: created once per process (sdlive_state), they dispatch to the newest loaded copy of these functions
# ---------------------------------------------------------------------------------------------------------------


def _cb_get_name(_type_data: int | None) -> int:
    return ctypes.addressof(state.name_buf)


def _cb_create(settings: int | None, source: int | None) -> int | None:
    """A new filter: its handle is a small libobs allocation, so that libobs' own ``bfree`` can be the C ``destroy``
    (no Python involved: libobs may destroy a filter after OBS finalized its Python). The Python side of the destroy
    runs in the source's "destroy" signal, which libobs emits just before, and which the atexit hook disconnects."""
    if state.python_exiting or not source:
        return None
    handle = lib.bmalloc(8) or 0
    try:
        inst = FilterInstance(handle, source)
        with state.instances_lock:
            state.instances[handle] = inst
        lib.signal_handler_connect(lib.obs_source_get_signal_handler(source), b"destroy",
                                   state.callbacks["destroyed"], handle)
        info(f"filter '{inst.name}' created (instance {handle:#x})")
        inst.update(settings or 0)  # libobs does not call update() after create()
        return handle
    except Exception as exc:  # noqa: BLE001 - never raise into libobs
        warn(f"create failed: {exc!r}")
        with state.instances_lock:
            state.instances.pop(handle, None)
        lib.bfree(handle)
        return None


def _cb_destroyed(handle: int | None, _calldata: int | None) -> None:
    """The filter source's "destroy" signal: stop its worker and free its graphics (libobs then bfrees the handle)."""
    with state.instances_lock:
        inst = state.instances.pop(handle or 0, None)
    if inst is not None:
        inst.shutdown()
        info(f"filter '{inst.name}' destroyed (instance {handle:#x})")


def _on_python_exit() -> None:
    """OBS finalizes its Python (at exit, before libobs destroys the last sources): release every filter now, while
    Python runs, and cut the signal that would call into it later; libobs' destroy is then C alone (bfree)."""
    state.python_exiting = True
    live = state.all_instances()
    for inst in live:
        lib.signal_handler_disconnect(lib.obs_source_get_signal_handler(inst.source), b"destroy",
                                      state.callbacks["destroyed"], inst.handle)
        inst.link.stop()
    for inst in live:
        inst.shutdown()
    with state.instances_lock:
        state.instances.clear()
    info(f"Python is finalizing: {len(live)} live filter(s) released; they pass their source through from now on")


def _cb_get_defaults(settings: int | None) -> None:
    sdlive_settings.set_defaults(settings or 0)


def _cb_get_properties(_handle: int | None) -> int:
    return sdlive_settings.properties(state.preset_names)


def _cb_update(handle: int | None, settings: int | None) -> None:
    inst = state.instances.get(handle or 0)
    if inst is not None:
        inst.update(settings or 0)


def _cb_video_render(handle: int | None, _effect: int | None) -> None:
    inst = state.instances.get(handle or 0)  # None after the atexit hook (video is stopped by then anyway)
    if inst is not None and not inst.render():
        lib.obs_source_skip_video_filter(inst.source)


def _impl() -> Any:
    return state.impl


def register_filter() -> None:
    """Register the filter once per process; later loads only swap the implementation the callbacks reach."""
    state.impl = sys.modules[__name__]
    if state.registered:
        info("filter already registered in this OBS process; reusing it")
        return
    callbacks = {
        "get_name": GET_NAME(lambda d: _impl()._cb_get_name(d)),
        "create": CREATE(lambda s, src: _impl()._cb_create(s, src)),
        "destroyed": SIGNAL_CALLBACK(lambda h, cd: _impl()._cb_destroyed(h, cd)),
        "get_defaults": GET_DEFAULTS(lambda s: _impl()._cb_get_defaults(s)),
        "get_properties": GET_PROPERTIES(lambda h: _impl()._cb_get_properties(h)),
        "update": UPDATE(lambda h, s: _impl()._cb_update(h, s)),
        "video_render": VIDEO_RENDER(lambda h, e: _impl()._cb_video_render(h, e)),
    }
    si = SourceInfo()
    si.id = FILTER_ID.encode()
    si.type = obs.OBS_SOURCE_TYPE_FILTER
    si.output_flags = obs.OBS_SOURCE_VIDEO
    for field, fn in callbacks.items():
        if field != "destroyed":
            setattr(si, field, fn)
    si.destroy = ctypes.cast(lib.bfree, DESTROY)  # C only: see _cb_create
    state.source_info, state.callbacks = si, callbacks  # alive for the whole process
    atexit.register(lambda: _impl()._on_python_exit())
    lib.obs_register_source_s(ctypes.byref(si), ctypes.sizeof(si))
    state.registered = True
    info(f"registered video filter '{FILTER_ID}' (obs_source_info prefix of {ctypes.sizeof(si)} bytes)")


# ---------------------------------------------------------------------------------------------------------------
# OBS script entry points
# ---------------------------------------------------------------------------------------------------------------
_stats: StatsWriter | None = None


def _stats_snapshot() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "time": time.time(),
        "protocol": constants.PROTOCOL_VERSION,
        "protocol_dir": PROTOCOL_DIR,
        "hotkeys": sdlive_hotkeys.names(),
        "presets": list(state.preset_names),
        "filters": [inst.stats() for inst in state.all_instances()],
    }


def script_description() -> str:
    return (
        "<b>sdlive</b>: real-time generative restyling. Adds the <b>sdlive</b> video filter (right-click a source → "
        "Filters → + → sdlive). Start the daemon with <code>sdlive serve</code>. Hotkeys: Settings → Hotkeys → "
        "\"sdlive: preset …\"."
    )


def script_load(settings: Any) -> None:
    global _stats
    register_filter()
    file_presets, problems = sdlive_presets.read_preset_files()
    for problem in problems:
        warn(f"presets: {problem}")
    sdlive_hotkeys.register(settings, file_presets)
    path = os.environ.get(ENV_STATS)
    if path:
        _stats = StatsWriter(path, _stats_snapshot).start()
    info(f"script loaded (Python {sys.version.split()[0]}, standard library in {sys.prefix}; "
         f"{constants.PROTOCOL_VERSION} from {PROTOCOL_DIR})")


def script_save(settings: Any) -> None:
    sdlive_hotkeys.save(settings)


def script_unload() -> None:
    # Live filter instances keep running on the process state (libobs owns them); only this load's extras stop.
    global _stats
    if _stats is not None:
        _stats.stop()
        _stats = None
    sdlive_hotkeys.unregister()
    info("script unloaded")
