"""A session's parameters: the protocol's ``GenerationParams`` (one definition for the engine, presets and wire)."""

from __future__ import annotations

from ..protocol.params import GenerationParams

SessionParams = GenerationParams
"""What a session generates with; the engine's name for :class:`~sdlive.daemon.protocol.params.GenerationParams`."""

__all__ = ["SessionParams"]
