"""A narrow fault-injection hook for tests of the daemon's failure paths (docs/security.md, "Failures").

No client input can make the IO thread, the compute loop or an output release fail any more (each real trigger
found was fixed at its root), yet what the daemon does when one *does* fail, from a bug not found yet, must be
proven on a real process. ``SDLIVE_TEST_FAULT`` names the places that raise once, each at a fixed point:

* ``io``: the IO thread, on the first control message it receives (outside the per-request guard);
* ``loop``: the compute loop, on the first request it answers (outside the per-request guard);
* ``output``: the output thread, on the first output it releases (confined to that output's session).

Unset (always, outside tests) it costs one set lookup per call.
"""

from __future__ import annotations

import os
import threading

FAULT_ENV = "SDLIVE_TEST_FAULT"
PLACES = frozenset({"io", "loop", "output"})

_armed = {p.strip() for p in os.environ.get(FAULT_ENV, "").split(",") if p.strip() in PLACES}
_lock = threading.Lock()


class InjectedFault(RuntimeError):
    """The fault ``SDLIVE_TEST_FAULT`` asked for."""


def check(place: str) -> None:
    """Raise :class:`InjectedFault` the first time ``place`` is reached, if ``SDLIVE_TEST_FAULT`` names it."""
    if not _armed:
        return
    with _lock:
        if place not in _armed:
            return
        _armed.discard(place)
    raise InjectedFault(f"injected fault in {place} ({FAULT_ENV})")
