"""The streaming engine: a loaded model (``StreamEngine``) and the per-stream loop (``StreamSession``); the types a
caller sees them through are in ``interface`` (``Engine``, ``EngineSession``, ``OutputFrame``, ``StageTimes``)."""

from .engine import StreamEngine
from .interface import Engine, EngineSession, InsufficientMemory, OutputFrame, Pixels, StageTimes
from .params import SessionParams
from .session import StreamSession

__all__ = [
    "Engine",
    "EngineSession",
    "InsufficientMemory",
    "OutputFrame",
    "Pixels",
    "SessionParams",
    "StageTimes",
    "StreamEngine",
    "StreamSession",
]
