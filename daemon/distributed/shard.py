"""``--gpus N --mode shard``: one engine per device in the daemon's process, each session wholly on one of them."""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

from ..engine.engine import StreamEngine
from ..engine.session import StreamSession
from ..protocol.params import GenerationParams

__all__ = ["ShardedEngine"]

log = logging.getLogger(__name__)


class ShardedEngine:
    """Several :class:`StreamEngine` (one per device) as one engine: a new session goes to the device with the most
    free memory (on CPUs, and between equals: the one with the fewest sessions). Implements
    :class:`~sdlive.daemon.engine.interface.Engine`."""

    def __init__(self, engines: list[StreamEngine]) -> None:
        if not engines:
            raise ValueError("a sharded engine needs at least one engine")
        self.engines = engines
        self._sessions: list[weakref.WeakSet[StreamSession]] = [weakref.WeakSet() for _ in engines]

    @property
    def model_name(self) -> str:
        return self.engines[0].model_name

    @property
    def device(self) -> torch.device:
        return self.engines[0].device

    @property
    def compat(self) -> str:
        return self.engines[0].compat

    @property
    def parallel(self) -> str:
        """How this engine spans devices now, for the daemon's ``hello`` and ``status``."""
        return f"sessions sharded over {len(self.engines)} devices: {self.describe()}"

    @property
    def cache_policy(self) -> Any:
        return self.engines[0].cache_policy

    @property
    def prompt_vocabulary(self) -> list[str] | None:
        return self.engines[0].prompt_vocabulary

    def describe(self) -> str:
        return ", ".join(f"{len(s)} session(s) on {e.device}" for e, s in zip(self.engines, self._sessions, strict=True))

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Encoded for every device (each keeps its own copy); returns the first's."""
        return [engine.encode_prompt(prompt) for engine in self.engines][0]

    def placement(self) -> int:
        """The index of the engine a new session goes to."""
        def key(i: int) -> tuple[int, int]:
            free = self.engines[i].free_device_bytes()
            return (-(free or 0), len(self._sessions[i]))

        return min(range(len(self.engines)), key=key)

    def open_session(
        self, *, width: int, height: int, params: GenerationParams | None = None, pixel_format: str = "rgb24"
    ) -> StreamSession:
        index = self.placement()
        session = self.engines[index].open_session(width=width, height=height, params=params, pixel_format=pixel_format)
        self._sessions[index].add(session)
        log.info("session placed on %s (%s)", self.engines[index].device, self.describe())
        return session
