"""State that lives as long as the OBS process, across script reloads.

libobs keeps the filter's C callbacks (and the ``obs_source_info`` they sit in) for the whole process: the filter is
registered once, and its trampolines dispatch to ``impl``, the newest loaded entry module. Filter instances outlive
a reload too, and may outlive Python itself: OBS finalizes its Python (unloading the scripting module) before libobs
destroys the sources still referenced at shutdown, hence ``python_exiting``. This module is therefore imported once per process: the entry file re-imports every other sibling on
a reload, never this one (so a change to this file needs an OBS restart).
"""

from __future__ import annotations

import ctypes
import threading
import types
from typing import TYPE_CHECKING, Any

from sdlive_names import FILTER_DISPLAY_NAME

if TYPE_CHECKING:
    from sdlive_instance import FilterInstance

registered = False
source_info: Any = None  # the SourceInfo handed to obs_register_source_s
callbacks: dict[str, Any] = {}  # its CFUNCTYPE objects
name_buf = ctypes.create_string_buffer(FILTER_DISPLAY_NAME.encode())  # get_name returns a pointer into it
impl: types.ModuleType | None = None  # the newest loaded sdlive_filter module

instances: dict[int, FilterInstance] = {}  # handle → instance; the handle is the filter's data pointer for libobs
instances_lock = threading.Lock()
python_exiting = False  # set by the atexit hook: Python is about to finalize, no filter may reach it any more

preset_names: list[str] = []  # the order next/prev cycle through: the daemon's list once a filter connected
daemon_presets: dict[str, str | None] = {}  # name → default key, as the daemon last listed them


def all_instances() -> list[FilterInstance]:
    with instances_lock:
        return list(instances.values())
