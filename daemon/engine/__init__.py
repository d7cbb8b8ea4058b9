"""The streaming engine: a loaded model (``StreamEngine``) and the per-stream loop (``StreamSession``)."""

from .engine import StreamEngine
from .params import SessionParams
from .session import OutputFrame, StreamSession

__all__ = ["OutputFrame", "SessionParams", "StreamEngine", "StreamSession"]
