"""Stable error codes of the control protocol and the exception that carries them.

The codes are part of the wire contract (``docs/protocol.md``): clients switch on them, so they never change
meaning and new ones are only ever added.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = ["ERROR_CODES", "ErrorCode", "ProtocolError"]


class ErrorCode(str, Enum):
    """The ``error.code`` strings a reply may carry."""

    BAD_JSON = "bad_json"  # the message is not UTF-8 JSON
    BAD_REQUEST = "bad_request"  # valid JSON, but not a valid request (schema validation, missing op, non-object)
    UNKNOWN_OP = "unknown_op"  # "op" names no operation this daemon knows
    TOO_LARGE = "too_large"  # the message is larger than MAX_MESSAGE_BYTES (64 KiB)
    UNAUTHORIZED = "unauthorized"  # the daemon requires a token and the request's is missing or wrong
    UNKNOWN_SESSION = "unknown_session"  # no open session has that session_id
    UNKNOWN_PRESET = "unknown_preset"  # no preset has that name
    BAD_PARAMS = "bad_params"  # a generation parameter is out of range or rejected by the engine
    CAPACITY = "capacity"  # the daemon cannot take another session (max sessions, memory)
    INTERNAL = "internal"  # the daemon failed; the message says what, the daemon keeps running
    LOADING = "loading"  # the daemon is still loading its model: retry when hello/status say state "ready"

    def __str__(self) -> str:
        return self.value


ERROR_CODES: frozenset[str] = frozenset(code.value for code in ErrorCode)


class ProtocolError(Exception):
    """A request the daemon answers with ``{"ok": false, "error": {"code", "message"}}``.

    ``id`` is the request's id when it could be recovered from the message, so the error reply can echo it.
    """

    def __init__(self, code: ErrorCode | str, message: str, *, id: Any = None) -> None:
        self.code = ErrorCode(code)
        self.message = message
        self.id = id
        super().__init__(f"{self.code.value}: {message}")

    def to_dict(self) -> dict[str, Any]:
        """The reply this error becomes (a JSON-ready dict)."""
        return {"ok": False, "id": self.id, "error": {"code": self.code.value, "message": self.message}}
