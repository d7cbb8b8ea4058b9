"""Prompt encoding off the compute loop, so a preset switch never stalls the streams."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.interface import Engine

log = logging.getLogger(__name__)


class PromptWarmer:
    """Encodes prompts on a worker thread.

    The first encode of a prompt can take seconds (the text encoder loads; on CPU it is slow); the engine keeps
    the result in memory and on disk, after which ``set_params`` with that prompt is instant. A change to a prompt
    not encoded yet waits in the :class:`~.changes.ChangeQueue` until the worker is done. Every use of the text
    encoder, here or on the compute thread, holds :attr:`lock`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.RLock()
        self._ready: set[str] = set()
        self._pending: dict[str, Future[None]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdlive-prompts")

    def is_ready(self, prompt: str) -> bool:
        return prompt in self._ready

    def failed(self, prompt: str) -> BaseException | None:
        """The error of a finished, failed encode of ``prompt`` (reported once), else None."""
        future = self._pending.get(prompt)
        if future is not None and future.done() and future.exception() is not None:
            self._pending.pop(prompt, None)
            return future.exception()
        return None

    def request(self, prompt: str) -> None:
        """Encode ``prompt`` in the background unless it is encoded or on its way."""
        if prompt not in self._ready and prompt not in self._pending:
            self._pending[prompt] = self._executor.submit(self._encode, prompt)

    def _encode(self, prompt: str) -> None:
        import torch

        started = time.perf_counter()
        with self.lock, torch.inference_mode():
            self.engine.encode_prompt(prompt)
        self._ready.add(prompt)
        self._pending.pop(prompt, None)
        log.debug("prompt encoded in %.2f s: %.60s", time.perf_counter() - started, prompt)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
