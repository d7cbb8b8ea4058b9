"""What the daemon's threads hand each other: the typed items on the compute loop's inbox and the IO thread's outbox.

Inbound (IO thread → compute loop, a ``queue.Queue``): requests only the loop can answer, queued parameter changes,
network frames, shutdown. Outbound (compute loop / output thread → IO thread, the :class:`~.io_thread.Outbox`):
replies, PUB messages, network frames, network sockets to bind or drop. The IO thread is the only owner of sockets.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel

from ..protocol.errors import ProtocolError
from ..protocol.messages import CloseSessionRequest, NetEndpoints, OpenSessionRequest, StatusRequest

LoopRequestMessage = OpenSessionRequest | CloseSessionRequest | StatusRequest
"""The ops the compute loop answers (they need the engine or the sessions' live figures); the IO thread answers
the others itself (``ops.FrontDesk``)."""
LOOP_REQUEST_TYPES = (OpenSessionRequest, CloseSessionRequest, StatusRequest)
"""The same, for ``isinstance``."""

# ------------------------------------------------------------------------------------------------------ inbound


@dataclass(frozen=True)
class LoopRequest:
    """A decoded, authorised request for the compute loop, with the ROUTER envelope its reply goes back to."""

    envelope: list[bytes]
    message: LoopRequestMessage
    received_ns: int


@dataclass(frozen=True)
class ParamsChange:
    """A ``set_preset`` / ``set_params`` the IO thread validated and acknowledged: apply it, in order."""

    session_id: str
    changes: dict[str, Any]
    preset: str | None
    lora: LoraChoice | None = None
    """A preset switch's LoRA (a path of None: no LoRA); None for ``set_params``, which leaves the LoRA alone."""


@dataclass(frozen=True)
class LoraChoice:
    """The LoRA a preset styles with: ``path`` None is "none"."""

    path: str | None
    strength: float = 1.0


@dataclass(frozen=True)
class NetInput:
    """A frame received on a network session's input socket."""

    session_id: str
    seq: int
    timestamp_ns: int
    pixels: np.ndarray
    received_ns: int


@dataclass(frozen=True)
class NetInputError:
    """A network session sent something that is not one of its frames."""

    session_id: str
    message: str


@dataclass(frozen=True)
class Shutdown:
    """Stop the daemon (a signal, or the ``shutdown`` op)."""

    reason: str


@dataclass(frozen=True)
class IOFailed:
    """The IO thread died: the daemon cannot talk to anyone and stops, publishing the dead sentinel."""

    reason: str


InboundItem = LoopRequest | ParamsChange | NetInput | NetInputError | Shutdown | IOFailed

# ----------------------------------------------------------------------------------------------------- outbound


@dataclass(frozen=True)
class Reply:
    """A reply to send: the op's reply model, or an error."""

    envelope: list[bytes]
    request_id: str | int | None
    body: BaseModel | None = None
    error: ProtocolError | None = None


@dataclass(frozen=True)
class Publish:
    """A PUB message: ``topic`` and its model (``messages.PUB_MODELS``)."""

    topic: str
    message: BaseModel


@dataclass(frozen=True)
class NetOutput:
    """A restyled frame for a network session's output socket."""

    session_id: str
    seq: int
    timestamp_ns: int
    pixels: np.ndarray
    pixel_format: str
    encoding: str
    quality: int


@dataclass
class NetCounters:
    """Written by the IO thread, read by the session's stats: outputs that could not be sent (no reader)."""

    sent_dropped: int = 0


@dataclass(frozen=True)
class NetAttach:
    """Bind a network session's PULL (frames in) and PUSH (frames out) on ephemeral ports; ``bound`` resolves to
    their endpoints (or the bind error)."""

    session_id: str
    width: int
    height: int
    pixel_format: str
    queue_frames: int
    counters: NetCounters
    bound: Future[NetEndpoints] = field(default_factory=Future)


@dataclass(frozen=True)
class NetDetach:
    """Close a network session's sockets."""

    session_id: str


OutboundItem = Reply | Publish | NetOutput | NetAttach | NetDetach
