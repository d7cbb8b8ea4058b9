"""libobs through ctypes: the C functions the filter calls, the leading fields of ``struct obs_source_info`` and the
callback types, logging, and small helpers over ``obs_data_t``.

OBS's Python API (``obspython``) has no ``obs_register_source``, and its graphics wrappers copy pixels through
Python objects; the filter calls libobs directly instead (DESIGN §5). Enums come from ``obspython``, never
hard-coded numbers. Every pointer is a plain int here (``c_void_p``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from typing import Any

import obspython as obs


def _find_libobs() -> ctypes.CDLL:
    names: list[str] = []
    if sys.platform == "win32":
        names = ["obs.dll", "obs"]
    elif sys.platform == "darwin":
        names = ["libobs.framework/libobs", "libobs.dylib"]
    found = ctypes.util.find_library("obs")
    if found:
        names.insert(0, found)
    names += ["libobs.so.0", "libobs.so.29", "libobs.so.30", "libobs.so"]
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    raise OSError("sdlive: could not load libobs; tried " + "; ".join(errors))


lib = _find_libobs()

VP = ctypes.c_void_p
U32 = ctypes.c_uint32
CP = ctypes.c_char_p


def _sig(name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


class Vec4(ctypes.Structure):
    _fields_ = [("x", ctypes.c_float), ("y", ctypes.c_float), ("z", ctypes.c_float), ("w", ctypes.c_float)]


lib.blog.restype = None  # blog(int, const char *fmt, ...): variadic, so no argtypes (ctypes passes them as varargs)
_sig("obs_register_source_s", None, VP, ctypes.c_size_t)
_sig("obs_filter_get_target", VP, VP)
_sig("obs_filter_get_parent", VP, VP)
_sig("obs_source_get_base_width", U32, VP)
_sig("obs_source_get_base_height", U32, VP)
_sig("obs_source_get_name", CP, VP)
_sig("obs_source_skip_video_filter", None, VP)
_sig("obs_source_draw", None, VP, ctypes.c_int, ctypes.c_int, U32, U32, ctypes.c_bool)
_sig("obs_source_get_settings", VP, VP)
_sig("obs_source_get_signal_handler", VP, VP)
_sig("bmalloc", VP, ctypes.c_size_t)
_sig("bfree", None, VP)
_sig("obs_get_base_effect", VP, ctypes.c_int)
_sig("obs_get_video_frame_time", ctypes.c_uint64)
_sig("obs_enter_graphics", None)
_sig("obs_leave_graphics", None)
_sig("gs_effect_loop", ctypes.c_bool, VP, CP)
_sig("gs_texrender_create", VP, ctypes.c_int, ctypes.c_int)
_sig("gs_texrender_destroy", None, VP)
_sig("gs_texrender_reset", None, VP)
_sig("gs_texrender_begin", ctypes.c_bool, VP, U32, U32)
_sig("gs_texrender_end", None, VP)
_sig("gs_texrender_get_texture", VP, VP)
_sig("gs_stagesurface_create", VP, U32, U32, ctypes.c_int)
_sig("gs_stagesurface_destroy", None, VP)
_sig("gs_stage_texture", None, VP, VP)
_sig("gs_stagesurface_map", ctypes.c_bool, VP, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(U32))
_sig("gs_stagesurface_unmap", None, VP)
_sig("gs_texture_create", VP, U32, U32, ctypes.c_int, U32, VP, U32)
_sig("gs_texture_destroy", None, VP)
_sig("gs_texture_set_image", None, VP, VP, U32, ctypes.c_bool)
_sig("gs_clear", None, U32, ctypes.POINTER(Vec4), ctypes.c_float, ctypes.c_uint8)
_sig("gs_ortho", None, *([ctypes.c_float] * 6))
_sig("gs_blend_state_push", None)
_sig("gs_blend_state_pop", None)
_sig("gs_blend_function", None, ctypes.c_int, ctypes.c_int)
_sig("gs_blend_function_separate", None, *([ctypes.c_int] * 4))
_sig("obs_data_get_string", CP, VP, CP)
_sig("obs_data_get_int", ctypes.c_longlong, VP, CP)
_sig("obs_data_get_double", ctypes.c_double, VP, CP)
_sig("obs_data_set_string", None, VP, CP, CP)
_sig("obs_data_set_default_string", None, VP, CP, CP)
_sig("obs_data_set_default_int", None, VP, CP, ctypes.c_longlong)
_sig("obs_data_set_default_double", None, VP, CP, ctypes.c_double)
_sig("obs_data_release", None, VP)
_sig("obs_properties_create", VP)
_sig("obs_properties_add_text", VP, VP, CP, CP, ctypes.c_int)
_sig("obs_properties_add_list", VP, VP, CP, CP, ctypes.c_int, ctypes.c_int)
_sig("obs_property_list_add_string", ctypes.c_size_t, VP, CP, CP)
_sig("obs_properties_add_int_slider", VP, VP, CP, CP, ctypes.c_int, ctypes.c_int, ctypes.c_int)
_sig("obs_properties_add_float_slider", VP, VP, CP, CP, ctypes.c_double, ctypes.c_double, ctypes.c_double)
_sig("obs_property_set_long_description", None, VP, CP)

# Callback types of struct obs_source_info (the filter's only C entry points)
GET_NAME = ctypes.CFUNCTYPE(VP, VP)  # returns const char*: a pointer into a buffer kept alive for the process
CREATE = ctypes.CFUNCTYPE(VP, VP, VP)
DESTROY = ctypes.CFUNCTYPE(None, VP)
GET_DEFAULTS = ctypes.CFUNCTYPE(None, VP)
GET_PROPERTIES = ctypes.CFUNCTYPE(VP, VP)
UPDATE = ctypes.CFUNCTYPE(None, VP, VP)
VIDEO_RENDER = ctypes.CFUNCTYPE(None, VP, VP)
SIGNAL_CALLBACK = ctypes.CFUNCTYPE(None, VP, VP)  # signal_callback_t: (void *data, calldata_t *cd)

_sig("signal_handler_connect", None, VP, CP, SIGNAL_CALLBACK, VP)
_sig("signal_handler_disconnect", None, VP, CP, SIGNAL_CALLBACK, VP)


class SourceInfo(ctypes.Structure):
    """The leading fields of libobs' ``struct obs_source_info`` (stable since OBS 26); ``obs_register_source_s``
    copies only ``size`` bytes, so the fields after ``video_render`` stay zero (unused)."""

    _fields_ = [
        ("id", CP),
        ("type", ctypes.c_int),
        ("output_flags", U32),
        ("get_name", GET_NAME),
        ("create", CREATE),
        ("destroy", DESTROY),
        ("get_width", VP),
        ("get_height", VP),
        ("get_defaults", GET_DEFAULTS),
        ("get_properties", GET_PROPERTIES),
        ("update", UPDATE),
        ("activate", VP),
        ("deactivate", VP),
        ("show", VP),
        ("hide", VP),
        ("video_tick", VP),
        ("video_render", VIDEO_RENDER),
    ]


# -- logging: libobs' blog is thread safe (print() from a worker thread is not guaranteed to reach the log) --------


def log(level: int, msg: str) -> None:
    lib.blog(ctypes.c_int(level), b"[sdlive] %s", msg.encode("utf-8", "replace"))


def info(msg: str) -> None:
    log(obs.LOG_INFO, msg)


def warn(msg: str) -> None:
    log(obs.LOG_WARNING, msg)


# -- obs_data_t helpers (raw pointers handed over by libobs) -------------------------------------------------------


def get_str(settings: int, key: str) -> str:
    raw = lib.obs_data_get_string(settings, key.encode())
    return raw.decode("utf-8", "replace") if raw else ""


def video_fps(fallback: float = 30.0) -> float:
    """OBS's output frame rate (Settings → Video)."""
    ovi = obs.obs_video_info()
    if obs.obs_get_video_info(ovi) and ovi.fps_den:
        return float(ovi.fps_num / ovi.fps_den)
    return fallback


@contextlib.contextmanager
def graphics() -> Iterator[None]:
    """Hold libobs' graphics context (obs_enter_graphics / obs_leave_graphics) for the ``with`` block."""
    lib.obs_enter_graphics()
    try:
        yield
    finally:
        lib.obs_leave_graphics()
