"""The streaming engine: a loaded model (``StreamEngine``) and the per-stream loop (``StreamSession``)."""

from .params import PIXEL_FORMATS, SessionParams
from .engine import StreamEngine
from .session import OutputFrame, StreamSession

__all__ = ["PIXEL_FORMATS", "OutputFrame", "SessionParams", "StreamEngine", "StreamSession"]
