"""The filter's settings: their defaults, the properties dialog, and reading them back (clamped to the daemon's
parameter bounds, which come from the wire contract's constants.py like every other number here)."""

from __future__ import annotations

from typing import NamedTuple

import obspython as obs
from sdlive_contract import constants
from sdlive_names import (
    AWAY_LAST_OUTPUT,
    AWAY_PASSTHROUGH,
    SETTING_ADDRESS,
    SETTING_PRESET,
    SETTING_STEPS,
    SETTING_STRENGTH,
    SETTING_TOKEN,
    SETTING_WHEN_AWAY,
)
from sdlive_obs_api import get_str, lib

TOKEN_HELP = (
    "Leave empty. The filter talks to a daemon on this computer over ZeroMQ and shared memory; a daemon with local "
    "auth (the default) is opened with your local secret, which the filter reads by itself (run OBS as the same user "
    "as `sdlive serve`). A daemon started with --token encrypts its sockets (CurveZMQ), which the filter cannot open: "
    "for such a daemon, or one on another PC, run `sdlive relay` on this computer (it holds the token) and give the "
    "filter the relay's address (docs/obs.md, Dual-PC). The filter sends this value with every request; no daemon "
    "needs it today."
)
STRENGTH_STEP = 0.01  # the slider's resolution; its lowest value is one step above the exclusive bound
MIN_STRENGTH = constants.NOISE_SCALE_MIN_EXCLUSIVE + STRENGTH_STEP
MAX_STRENGTH = constants.NOISE_SCALE_MAX


class FilterSettings(NamedTuple):
    """One filter's settings as the worker and the render thread use them."""

    address: str = constants.DEFAULT_CONTROL_ADDRESS
    token: str = ""
    preset: str = ""  # "" = the daemon's default preset
    steps: int = constants.DEFAULT_STEPS
    strength: float = constants.DEFAULT_NOISE_SCALE  # the session's noise_scale
    when_away: str = AWAY_PASSTHROUGH

    def params(self) -> dict[str, object]:
        """The generation parameters these settings set (``set_params`` / ``open_session.params``)."""
        return {"steps": self.steps, "noise_scale": self.strength}


def read(settings: int) -> FilterSettings:
    """The settings held by an ``obs_data_t``, empty fields defaulted and numbers clamped to the daemon's bounds."""
    steps = int(lib.obs_data_get_int(settings, SETTING_STEPS.encode()) or constants.DEFAULT_STEPS)
    strength = float(lib.obs_data_get_double(settings, SETTING_STRENGTH.encode()))
    return FilterSettings(
        address=get_str(settings, SETTING_ADDRESS).strip() or constants.DEFAULT_CONTROL_ADDRESS,
        token=get_str(settings, SETTING_TOKEN).strip(),
        preset=get_str(settings, SETTING_PRESET).strip(),
        steps=max(constants.STEPS_MIN, min(constants.STEPS_MAX, steps)),
        strength=max(MIN_STRENGTH, min(MAX_STRENGTH, strength)),
        when_away=get_str(settings, SETTING_WHEN_AWAY) or AWAY_PASSTHROUGH,
    )


def set_defaults(settings: int) -> None:
    defaults = FilterSettings()
    lib.obs_data_set_default_string(settings, SETTING_ADDRESS.encode(), defaults.address.encode())
    lib.obs_data_set_default_int(settings, SETTING_STEPS.encode(), defaults.steps)
    lib.obs_data_set_default_double(settings, SETTING_STRENGTH.encode(), defaults.strength)
    lib.obs_data_set_default_string(settings, SETTING_WHEN_AWAY.encode(), defaults.when_away.encode())


def set_preset(source: int, name: str) -> None:
    """Store a preset chosen outside the dialog (a hotkey) in the filter's settings, so the dialog and the saved
    scene collection show it."""
    settings = lib.obs_source_get_settings(source)
    if settings:
        lib.obs_data_set_string(settings, SETTING_PRESET.encode(), name.encode())
        lib.obs_data_release(settings)


def properties(preset_names: list[str]) -> int:
    """The properties dialog (an ``obs_properties_t*`` that libobs takes ownership of)."""
    props = lib.obs_properties_create()
    p = lib.obs_properties_add_text(props, SETTING_ADDRESS.encode(), b"Daemon address", obs.OBS_TEXT_DEFAULT)
    lib.obs_property_set_long_description(
        p, f"ZeroMQ control address of `sdlive serve` (default {constants.DEFAULT_CONTROL_ADDRESS})".encode()
    )
    p = lib.obs_properties_add_text(props, SETTING_TOKEN.encode(), b"Token (leave empty)",
                                    obs.OBS_TEXT_PASSWORD)
    lib.obs_property_set_long_description(p, TOKEN_HELP.encode())
    p = lib.obs_properties_add_list(
        props, SETTING_PRESET.encode(), b"Preset", obs.OBS_COMBO_TYPE_EDITABLE, obs.OBS_COMBO_FORMAT_STRING
    )
    for name in preset_names:
        lib.obs_property_list_add_string(p, name.encode(), name.encode())
    lib.obs_properties_add_int_slider(
        props, SETTING_STEPS.encode(), b"Steps", constants.STEPS_MIN, constants.STEPS_MAX, 1
    )
    lib.obs_properties_add_float_slider(
        props, SETTING_STRENGTH.encode(), b"Strength (noise)", MIN_STRENGTH, MAX_STRENGTH, STRENGTH_STEP
    )
    p = lib.obs_properties_add_list(
        props, SETTING_WHEN_AWAY.encode(), b"While the daemon is away", obs.OBS_COMBO_TYPE_LIST,
        obs.OBS_COMBO_FORMAT_STRING,
    )
    lib.obs_property_list_add_string(p, b"Show the source (pass through)", AWAY_PASSTHROUGH.encode())
    lib.obs_property_list_add_string(p, b"Hold the last styled frame", AWAY_LAST_OUTPUT.encode())
    return props
