"""While the model loads: the daemon answers at once and says how far it is (issue 16).

The sockets are bound before the load (a busy port fails in a second), and from then on the IO thread answers
through a :class:`LoadingDesk` until the compute loop opens its real front desk: ``hello`` and ``status`` with
``state: "loading"`` and a :class:`~sdlive.daemon.protocol.messages.LoadingInfo` (the loader's latest stage,
stages done, seconds elapsed), ``list_presets`` and ``heartbeat`` as usual, ``shutdown`` (which also interrupts the
load), and a ``loading`` error for everything that needs the model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pydantic import BaseModel

from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.messages import HeartbeatReply, HelloReply, LoadingInfo, Request, ShutdownReply, StatusReply
from .items import InboundItem, Shutdown

STAGE_STARTING = "starting"
STAGE_WARMUP = "warming up"


class LoadProgress:
    """The load's progress, written by the loading thread (the loader's ``progress`` callback), read by the IO
    thread."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.started_ns = time.monotonic_ns()
        self._lock = threading.Lock()
        self._stage = STAGE_STARTING
        self._done = 0

    def update(self, stage: str) -> None:
        """A new stage began (the previous one is done)."""
        with self._lock:
            if self._stage != STAGE_STARTING:
                self._done += 1
            self._stage = stage

    @property
    def elapsed_s(self) -> float:
        return (time.monotonic_ns() - self.started_ns) / 1e9

    def info(self) -> LoadingInfo:
        with self._lock:
            stage, done = self._stage, self._done
        return LoadingInfo(model=self.model, stage=stage, stages_done=done, elapsed_s=round(self.elapsed_s, 2))


class LoadingDesk:
    """The IO thread's answers while the model loads. ``hello`` / ``status`` are templates (the ready daemon's
    fields as far as they are known) that get ``state: "loading"`` and the progress."""

    def __init__(
        self,
        *,
        progress: LoadProgress,
        hello: HelloReply,
        status: Callable[[], StatusReply],
        presets: Callable[[], BaseModel],
        submit: Callable[[InboundItem], None],
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.progress = progress
        self.hello = hello
        self.status = status
        self.presets_reply = presets
        self.submit = submit
        self.interrupt = interrupt
        """Stops the load itself (``serve`` sends its process SIGTERM); without it a shutdown waits for the load."""

    def answer(self, message: Request) -> BaseModel:
        info = self.progress.info()
        if message.op == "hello":
            return self.hello.model_copy(update={"state": "loading", "loading": info})
        if message.op == "status" and message.session_id is None:
            return self.status().model_copy(update={"state": "loading", "loading": info})
        if message.op == "list_presets":
            return self.presets_reply()
        if message.op == "heartbeat" and message.session_id is None:
            return HeartbeatReply()
        if message.op == "shutdown":
            self.submit(Shutdown("shutdown requested while loading"))
            if self.interrupt is not None:
                self.interrupt()
            return ShutdownReply()
        raise ProtocolError(
            ErrorCode.LOADING,
            f"model {info.model} is loading ({info.elapsed_s:.0f} s, {info.stage}): {message.op} needs it; retry when "
            'hello or status says state "ready"',
            id=message.id,
        )
