"""sdlive's client side: the daemon client, capture sources, sinks and the restyling virtual camera (no torch).

The public names, imported lazily (``import sdlive.obs_bridge`` stays cheap for the CLI and the OBS script)::

    from sdlive.obs_bridge import StyledCamera, DaemonClient, open_source, open_sink
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["StyledCamera", "DaemonClient", "open_source", "open_sink"]

_HOMES = {
    "StyledCamera": "vcam",
    "DaemonClient": "client",
    "open_source": "capture",
    "open_sink": "sinks",
}

if TYPE_CHECKING:  # pragma: no cover
    from .capture import open_source
    from .client import DaemonClient
    from .sinks import open_sink
    from .vcam import StyledCamera


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
