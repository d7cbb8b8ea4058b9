"""sdlive's client side: the daemon client, capture sources, sinks and the restyling virtual camera (no torch).

Layout by role:

- ``client``: the client library (``DaemonClient``, ``SessionClient``), typed by the wire contract's models.
- ``media``: frames in and out: ``capture`` (sources), ``sinks``, ``pump`` (source → session → sinks), ``vcam``.
- ``cli``: the ``sdlive`` console script (typer): ``daemon``, ``media``, ``models``, ``obs`` command groups.
- ``obs_script`` / ``obs_setup`` / ``obsws_tools``: the OBS side.

The public names, imported lazily (``import sdlive.obs_bridge`` stays cheap for the CLI and the OBS script)::

    from sdlive.obs_bridge import StyledCamera, DaemonClient, open_source, open_sink
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["StyledCamera", "DaemonClient", "open_source", "open_sink"]

_HOMES = {
    "StyledCamera": ".media.vcam",
    "DaemonClient": ".client",
    "open_source": ".media.capture",
    "open_sink": ".media.sinks",
}

if TYPE_CHECKING:  # pragma: no cover
    from .client import DaemonClient
    from .media.capture import open_source
    from .media.sinks import open_sink
    from .media.vcam import StyledCamera


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
