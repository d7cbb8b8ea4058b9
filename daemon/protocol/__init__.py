"""The wire contract between the sdlive daemon and its clients (docs/protocol.md).

- ``messages``: pydantic models of every control request/reply and PUB message, ``decode_request``, reply builders.
- ``errors``: the stable error codes and ``ProtocolError``.
- ``ring``: the shared-memory frame ring (stdlib only, loadable as a standalone file).
- ``netframe``: the network frame header and raw/JPEG codecs (numpy; cv2 imported lazily for JPEG).
"""

from .errors import ERROR_CODES, ErrorCode, ProtocolError
from .messages import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Request,
    SessionStats,
    decode_request,
    error_reply,
    ok_reply,
)
from .ring import FrameRing, RingError, RingFrame

__all__ = [
    "ERROR_CODES",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "ErrorCode",
    "FrameRing",
    "ProtocolError",
    "Request",
    "RingError",
    "RingFrame",
    "SessionStats",
    "decode_request",
    "error_reply",
    "ok_reply",
]
