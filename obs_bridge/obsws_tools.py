"""Driving OBS from outside through obs-websocket v5 (obsws-python): what ``sdlive obs setup|preset|status`` do.

The filter's id, settings keys and hotkey names are the OBS script's own (``obs_script/sdlive_names.py``, loaded by
``obs_setup``). The headless OBS the tests and the benchmark run lives in ``tests/obs/harness.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from . import obs_setup

_NAMES = obs_setup.SCRIPT_NAMES
FILTER_KIND: str = _NAMES.FILTER_ID  # the source id the OBS script registers
DEFAULT_FILTER_NAME: str = _NAMES.FILTER_DISPLAY_NAME
HOTKEY_PREFIX: str = _NAMES.HOTKEY_PREFIX
SETTING_ADDRESS: str = _NAMES.SETTING_ADDRESS
SETTING_PRESET: str = _NAMES.SETTING_PRESET
MIN_OBS_VERSION = (29, 0)
MIN_WEBSOCKET_VERSION = (5, 0)


class ObsUnavailable(RuntimeError):
    """OBS's websocket did not answer: names the address and the fix."""


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def connect(host: str = "localhost", port: int = obs_setup.DEFAULT_WS_PORT, password: str = "",
            timeout: float = 3.0, hint: str = "") -> Any:
    """An obsws-python ``ReqClient``; raises ObsUnavailable naming the fix when OBS does not answer or refuses
    (``hint``: where the password came from)."""
    import obsws_python as obsws

    # obsws-python logs every failed request at ERROR level; its exceptions carry the same text.
    logging.getLogger("obsws_python").setLevel(logging.CRITICAL)
    try:
        return obsws.ReqClient(host=host, port=port, password=password or None, timeout=timeout)
    except (ConnectionRefusedError, OSError, TimeoutError) as exc:
        raise ObsUnavailable(
            f"OBS websocket at ws://{host}:{port} did not answer ({exc}). Start OBS and enable Tools → WebSocket "
            f"Server Settings → Enable WebSocket server (or run `python installer/install_obs.py --websocket` while "
            f"OBS is closed)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - obsws raises plain Exception subclasses for auth failures
        raise ObsUnavailable(
            f"OBS websocket at ws://{host}:{port} refused the connection: {exc}{hint}. Pass --password or set "
            "SDLIVE_OBS_PASSWORD (OBS shows it in Tools → WebSocket Server Settings → Show Connect Info)"
        ) from None


def check_versions(client: Any) -> dict[str, Any]:
    """OBS and obs-websocket versions, and whether they are new enough."""
    v = client.get_version()
    obs_v = _version_tuple(v.obs_version)
    ws_v = _version_tuple(v.obs_web_socket_version)
    problems: list[str] = []
    if obs_v[:2] < MIN_OBS_VERSION:
        problems.append(f"OBS {v.obs_version} is older than {'.'.join(map(str, MIN_OBS_VERSION))}: update OBS")
    if ws_v[:2] < MIN_WEBSOCKET_VERSION:
        problems.append(f"obs-websocket {v.obs_web_socket_version} is older than 5.0: update OBS (28+ bundles it)")
    return {
        "obs_version": v.obs_version,
        "websocket_version": v.obs_web_socket_version,
        "platform": getattr(v, "platform", ""),
        "problems": problems,
    }


def hotkey_names(client: Any) -> list[str]:
    return list(client.get_hotkey_list().hotkeys)


STEP_NAMES = (_NAMES.HOTKEY_NEXT[len(HOTKEY_PREFIX) :], _NAMES.HOTKEY_PREV[len(HOTKEY_PREFIX) :])  # next, prev


def preset_names(client: Any) -> list[str]:
    """The presets the script has a hotkey for (sorted), without the next / prev hotkeys."""
    return sorted(n[len(HOTKEY_PREFIX) :] for n in hotkey_names(client)
                  if n.startswith(HOTKEY_PREFIX) and n[len(HOTKEY_PREFIX) :] not in STEP_NAMES)


def script_loaded(client: Any) -> bool:
    """The sdlive script registers its preset hotkeys when it loads: their presence proves it runs."""
    return any(n.startswith(HOTKEY_PREFIX) for n in hotkey_names(client))


def input_names(client: Any) -> list[str]:
    return [i["inputName"] for i in client.get_input_list().inputs]


def sdlive_filters(client: Any) -> list[dict[str, Any]]:
    """Every sdlive filter on every input: [{source, filter, enabled, settings}]."""
    found: list[dict[str, Any]] = []
    for source in input_names(client):
        try:
            filters = client.get_source_filter_list(source).filters
        except Exception:  # noqa: BLE001 - a source that vanished meanwhile
            continue
        for f in filters:
            if f.get("filterKind") == FILTER_KIND:
                found.append(
                    {
                        "source": source,
                        "filter": f["filterName"],
                        "enabled": f.get("filterEnabled", True),
                        "settings": f.get("filterSettings", {}),
                    }
                )
    return found


def add_filter(client: Any, source: str, *, name: str = DEFAULT_FILTER_NAME,
               settings: dict[str, Any] | None = None) -> str:
    """Add (or update) the sdlive filter on ``source``. Returns what was done."""
    if source not in input_names(client):
        raise ValueError(f"OBS has no source named {source!r}; sources: {', '.join(input_names(client)) or '(none)'}")
    existing = [f["filterName"] for f in client.get_source_filter_list(source).filters]
    if name in existing:
        if settings:
            client.set_source_filter_settings(source, name, settings, True)
            return f"updated filter {name!r} on {source!r}"
        return f"filter {name!r} already on {source!r}"
    client.create_source_filter(source, name, FILTER_KIND, settings or {})
    return f"added filter {name!r} to {source!r}"


def trigger_preset(client: Any, name: str) -> str:
    """Press the script's hotkey for a preset name, or ``next`` / ``prev``."""
    hotkey = HOTKEY_PREFIX + name
    if hotkey not in hotkey_names(client):
        known = preset_names(client)
        if not known:
            raise ValueError("the sdlive script is not loaded in OBS (no sdlive hotkeys): run `sdlive obs setup`")
        raise ValueError(f"no hotkey for preset {name!r}; OBS has presets {', '.join(known)} (and next, prev)")
    client.trigger_hotkey_by_name(hotkey)
    return hotkey
