"""The wire contract's constants, defined once: versions, endpoints, limits, timing, pixel formats, parameter bounds.

Stdlib only and importable as a single standalone file (like ``ring.py``): the OBS script, which runs in OBS's own
Python without pydantic, numpy or pyzmq, loads it by path. It must never import anything outside the stdlib.
Everything else (the pydantic messages, the engine's parameters, the presets, the client library, the OBS script)
takes its numbers from here, so a bound or a default changes in one place.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

__all__ = [
    "DEFAULT_CONTROL_ADDRESS",
    "DEFAULT_NOISE_SCALE",
    "DEFAULT_PROMPT",
    "DEFAULT_SEED",
    "DEFAULT_STEPS",
    "DEFAULT_STREAM_BATCH",
    "DEFAULT_TRANSITION_CHUNKS",
    "DEFAULT_PUB_ADDRESS",
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_LIVENESS",
    "MAX_FPS",
    "MAX_HEIGHT",
    "MAX_MESSAGE_BYTES",
    "MAX_WIDTH",
    "MIN_SIZE",
    "NOISE_SCALE_MAX",
    "NOISE_SCALE_MIN_EXCLUSIVE",
    "PARAM_FIELDS",
    "PIXEL_FORMATS",
    "PROMPT_MAX_CHARS",
    "PROTOCOL_VERSION",
    "RECONNECT_INTERVAL_INIT_S",
    "RECONNECT_INTERVAL_MAX_S",
    "SEED_MAX_EXCLUSIVE",
    "SIZE_MULTIPLE",
    "STYLE_FIELDS",
    "STEPS_MAX",
    "STEPS_MIN",
    "TRANSITION_CHUNKS_MAX",
    "PixelFormatInfo",
    "host_of",
    "is_loopback_address",
]

# sdlive/2: set_preset/set_params are answered on receipt (the change is queued, `pending` says whether it is live
# yet) and the ring's in-band request fields are gone (docs/protocol.md, "Changes").
PROTOCOL_VERSION = "sdlive/2"
MAX_MESSAGE_BYTES = 65536
DEFAULT_CONTROL_ADDRESS = "tcp://127.0.0.1:5557"
DEFAULT_PUB_ADDRESS = "tcp://127.0.0.1:5558"

# Paranoid Pirate liveness (ZeroMQ Guide, ppworker): a peer silent for LIVENESS intervals is dead; reconnects back
# off by doubling from INIT up to MAX. Any message counts as life.
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3
RECONNECT_INTERVAL_INIT_S = 0.25
RECONNECT_INTERVAL_MAX_S = 2.0

# Session geometry a daemon accepts: width and height are multiples of SIZE_MULTIPLE (the VAE downsamples ×8, then
# the DiT takes 2×2 patches), from MIN_SIZE up to MAX_WIDTH × MAX_HEIGHT.
SIZE_MULTIPLE = 16
MIN_SIZE = 16
MAX_WIDTH = 7680
MAX_HEIGHT = 4320
MAX_FPS = 240.0


class PixelFormatInfo(NamedTuple):
    """One pixel format: its code in ring and network frame headers, bytes per pixel, and where R, G, B sit."""

    code: int
    bytes_per_pixel: int
    rgb_index: tuple[int, int, int]


PIXEL_FORMATS: dict[str, PixelFormatInfo] = {
    "bgra": PixelFormatInfo(1, 4, (2, 1, 0)),
    "rgba": PixelFormatInfo(2, 4, (0, 1, 2)),
    "rgb24": PixelFormatInfo(3, 3, (0, 1, 2)),
    "bgr24": PixelFormatInfo(4, 3, (2, 1, 0)),
}

# Generation parameters (DESIGN §3): their bounds and defaults. The pydantic model ``GenerationParams``
# (protocol/params.py) is built from these; the OBS script reads them to bound its properties. STYLE_FIELDS are
# the ones a preset sets and ``set_params`` changes; ``stream_batch`` is chosen once, at ``open_session``.
STYLE_FIELDS = ("prompt", "steps", "noise_scale", "seed", "transition_chunks")
PARAM_FIELDS = (*STYLE_FIELDS, "stream_batch")
PROMPT_MAX_CHARS = 2000
STEPS_MIN = 1
STEPS_MAX = 4
NOISE_SCALE_MIN_EXCLUSIVE = 0.0
NOISE_SCALE_MAX = 1.0
SEED_MAX_EXCLUSIVE = 2**63
TRANSITION_CHUNKS_MAX = 64
DEFAULT_PROMPT = "a cinematic film still, soft light, highly detailed"
DEFAULT_STEPS = 2
DEFAULT_NOISE_SCALE = 0.8
DEFAULT_SEED = 0
DEFAULT_TRANSITION_CHUNKS = 4
DEFAULT_STREAM_BATCH = True


def host_of(address: str) -> str:
    """The host of a ZeroMQ endpoint: ``tcp://HOST:PORT``, ``tcp://[::1]:PORT``, ``tcp://src;HOST:PORT``; ipc and
    inproc endpoints are ``localhost``. Raises ValueError for a string that is not an endpoint."""
    scheme, sep, rest = address.partition("://")
    if not sep or not rest:
        raise ValueError(f"not a ZeroMQ endpoint: {address!r} (expected e.g. {DEFAULT_CONTROL_ADDRESS})")
    if scheme in ("ipc", "inproc"):
        return "localhost"
    if ";" in rest:  # "tcp://source;dest": the destination decides
        rest = rest.split(";", 1)[1]
    if rest.startswith("["):
        end = rest.find("]")
        return rest[1:end] if end > 0 else rest
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def is_loopback_address(address: str) -> bool:
    """True for endpoints only this machine can reach: tcp on 127.0.0.0/8, ``::1`` or ``localhost``, ipc, inproc.

    Host names other than ``localhost`` are *not* loopback, even when they resolve there today: a name can change
    what it points at, and the cost of a wrong "local" is an unauthenticated daemon on the network."""
    scheme = address.partition("://")[0]
    host = host_of(address)
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", 0.0.0.0's name, an interface name or a host name: reachable from elsewhere
