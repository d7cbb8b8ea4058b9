"""What the daemon sees of a pipeline over ranks: ``PipelineEngine`` and its ``PipelineSession`` on rank 0, and the
command loop every other rank runs (``serve_worker``).

Every session operation is a command: rank 0 checks it first (a bad frame, value, prompt or LoRA file fails there,
before any rank moves), sends it to every rank, then runs it itself; every rank then runs the same ``StreamSession``
code, and the forwards inside it meet on the ring (``stage.StageEngine.run_forward``).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..engine.interface import OutputFrame, Pixels, StageTimes
from ..engine.session import StreamSession
from ..protocol.constants import PIXEL_FORMATS
from ..protocol.params import GenerationParams
from .partition import balance
from .stage import StageEngine

__all__ = ["PipelineEngine", "PipelineSession", "serve_worker"]

log = logging.getLogger(__name__)

PROMPTS_KEPT = 64
"""Prompt embeddings every rank keeps (the same ones on every rank: rank 0 sends each once)."""
REBALANCE_AFTER_FORWARDS = 24
"""Forwards measured before the one-time rebalance (``rebalance="auto"``)."""


class PipelineEngine:
    """The ranks' pipeline as one engine (implements :class:`~sdlive.daemon.engine.interface.Engine`).

    ``stage`` is rank 0's own :class:`StageEngine`; ``close()`` stops the other ranks. ``rebalance="auto"`` moves
    blocks once, after ``REBALANCE_AFTER_FORWARDS`` measured forwards, when the measured split is faster."""

    def __init__(self, stage: StageEngine, *, rebalance: str = "auto", on_close: Any = None) -> None:
        self.stage = stage
        self.ring = stage.ring
        self._lock = threading.RLock()  # one command at a time: the prompt warmer runs on its own thread
        self._sessions: dict[int, StreamSession] = {}
        self._next_id = 0
        self._sent_prompts: OrderedDict[str, None] = OrderedDict()  # what the other ranks hold, in their order
        self._rebalance = rebalance
        self.ranges: list[range] = self.ring.gather(stage.layers)
        self.rebalanced: list[range] | None = None
        self._on_close = on_close
        self._closed = False
        self.workers: list[Any] = []
        """The processes of the other ranks when this process started them (``launch.start_pipeline``)."""

    # ------------------------------------------------------------------ Engine

    @property
    def model_name(self) -> str:
        return self.stage.model_name

    @property
    def device(self) -> torch.device:
        return self.stage.device

    @property
    def compat(self) -> str:
        return self.stage.compat

    @property
    def cache_policy(self):
        return self.stage.cache_policy

    @property
    def prompt_vocabulary(self) -> list[str] | None:
        return self.stage.prompt_vocabulary

    @property
    def world(self) -> int:
        return self.ring.world

    @property
    def parallel(self) -> str:
        """How this engine spans devices now, for the daemon's ``hello`` and ``status``."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        return f"pipeline over {self.world} ranks ({backend} on {self.device.type}): blocks {self.describe()}"

    def describe(self) -> str:
        """``blocks 0-19 on rank 0, 20-39 on rank 1``."""
        return ", ".join(f"{r.start}-{r.stop - 1} on rank {i}" for i, r in enumerate(self.ranges))

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        with self._lock:
            embeds = self.stage.encode_prompt(prompt)
            if prompt in self._sent_prompts:
                self._sent_prompts.move_to_end(prompt)
                self._command("prompt", prompt, None)  # used again: the ranks keep it longer, in the same order
            else:
                self._command("prompt", prompt, embeds.cpu())
                self._sent_prompts[prompt] = None
                while len(self._sent_prompts) > PROMPTS_KEPT:
                    self._sent_prompts.popitem(last=False)
            return embeds

    def open_session(
        self, *, width: int, height: int, params: GenerationParams | None = None, pixel_format: str = "rgb24"
    ) -> PipelineSession:
        with self._lock:
            if params is None:
                params = GenerationParams(steps=self.stage.spec.default_steps, noise_scale=self.stage.spec.noise_scale)
            self.encode_prompt(params.prompt)
            # Opening checks the size and format: a failure here sends nothing to the other ranks.
            local = self.stage.open_session(width=width, height=height, params=params, pixel_format=pixel_format)
            sid = self._next_id
            self._next_id += 1
            self._command("open", sid, width, height, params.model_dump(), pixel_format)
            self._sessions[sid] = local
            return PipelineSession(self, sid, local)

    # ------------------------------------------------------------------ commands

    def _command(self, *command: Any) -> None:
        self.ring.broadcast(command)

    def run(self, sid: int, op: str, *args: Any, frame: Any = None) -> Any:
        """Send a session operation to every rank, then run it here; returns rank 0's result. A pushed ``frame``
        stays here: the other ranks push a blank stand-in of its shape."""
        with self._lock:
            self._command(op, sid, *args)
            result = _apply(self._sessions[sid], op, (frame,) if op == "push" else args)
            if op == "close":
                del self._sessions[sid]
            return result

    def after_push(self) -> None:
        """The one-time automatic rebalance, once enough forwards were measured."""
        if self._rebalance == "auto" and self.rebalanced is None and self.stage.timer.forwards >= REBALANCE_AFTER_FORWARDS:
            self.rebalance()

    def rebalance(self, ranges: list[range] | None = None) -> list[range]:
        """Move blocks between ranks: to ``ranges``, or to the split the measured times say is fastest (every
        rank measures itself; rank 0's time outside the blocks includes the VAE). Returns the split in effect."""
        with self._lock:
            self._command("rebalance", ranges)
            self.ranges = _rebalance(self.stage, self._sessions, ranges)
            self.rebalanced = self.ranges
            log.info("pipeline rebalanced: blocks %s", self.describe())
            return self.ranges

    def close(self) -> None:
        """Stop the other ranks and leave the process group (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._command("stop")
            except Exception as exc:  # noqa: BLE001 - a dead rank cannot be told to stop
                log.warning("could not stop the pipeline ranks: %s", exc)
            if self._on_close is not None:
                self._on_close()
            self.ring.close()


class PipelineSession:
    """One stream through the pipeline (implements :class:`~sdlive.daemon.engine.interface.EngineSession`)."""

    def __init__(self, engine: PipelineEngine, sid: int, local: StreamSession) -> None:
        self._engine, self._sid, self._local = engine, sid, local

    @property
    def params(self) -> GenerationParams:
        return self._local.params

    @property
    def latency_frames(self) -> int:
        return self._local.latency_frames

    @property
    def frames_in(self) -> int:
        return self._local.frames_in

    @property
    def frames_out(self) -> int:
        return self._local.frames_out

    @property
    def stage_ms(self) -> StageTimes:
        return self._local.stage_ms

    @property
    def chunks(self) -> int:
        return self._local.chunks

    def push(self, frame: Pixels | torch.Tensor) -> list[OutputFrame]:
        self._local.check_frame(frame)  # a bad frame raises here, before the other ranks push their stand-in
        chunks = self._local.chunks
        out = self._engine.run(self._sid, "push", frame=frame)
        if self._local.chunks != chunks:  # rank 0's part outside the blocks includes the VAE
            timer = self._engine.stage.timer
            timer.fixed_ms += self._local.stage_ms.encode + self._local.stage_ms.decode
        self._engine.after_push()
        result: list[OutputFrame] = out
        return result

    def flush(self) -> list[OutputFrame]:
        result: list[OutputFrame] = self._engine.run(self._sid, "flush")
        return result

    def set_params(self, **changes: Any) -> None:
        new = GenerationParams.model_validate({**self._local.params.model_dump(), **changes})
        self._engine.encode_prompt(new.prompt)  # an unknown prompt fails here; a new one reaches every rank
        self._engine.run(self._sid, "set_params", changes)

    def set_lora(self, path: str | None, strength: float = 1.0, *, transition_chunks: int | None = None) -> None:
        if path is not None:
            self._engine.stage.lora.load(path)  # a missing or mismatched file fails here
        self._engine.run(self._sid, "set_lora", path, strength, transition_chunks)

    def close(self) -> None:
        self._engine.run(self._sid, "close")


def _apply(session: StreamSession, op: str, args: tuple[Any, ...]) -> Any:
    """Run a session operation (the same on every rank; ``push``'s frame is rank 0's, a stand-in elsewhere)."""
    if op == "push":
        return session.push(args[0])
    if op == "flush":
        return session.flush()
    if op == "set_params":
        return session.set_params(**args[0])
    if op == "set_lora":
        path, strength, transition = args
        return session.set_lora(path, strength, transition_chunks=transition)
    if op == "close":
        return None
    raise ValueError(f"unknown pipeline operation {op!r}")


def _rebalance(stage: StageEngine, sessions: dict[int, StreamSession], ranges: list[range] | None) -> list[range]:
    summaries = stage.ring.gather(stage.timer.summary(len(stage.layers)))
    if ranges is None:
        block_ms = [max(s[0], 1e-6) for s in summaries]
        ranges = balance(block_ms, [s[1] for s in summaries], len(stage.transformer.blocks))
    stage.move_layers(list(ranges), [sessions[sid] for sid in sorted(sessions)])
    return list(ranges)


def serve_worker(stage: StageEngine) -> int:
    """A rank other than 0: run rank 0's commands until it says stop; returns the exit code."""
    ring = stage.ring
    sessions: dict[int, StreamSession] = {}
    blanks: dict[int, np.ndarray] = {}
    while True:
        command = ring.broadcast(None)
        op, *args = command
        if op == "stop":
            log.info("rank %d: stopping", ring.rank)
            return 0
        if op == "prompt":
            prompt, embeds = args
            if embeds is not None:
                stage.received_prompts[prompt] = embeds.to(stage.device, stage.dtype)
            stage.received_prompts.move_to_end(prompt)
            while len(stage.received_prompts) > PROMPTS_KEPT:
                stage.received_prompts.popitem(last=False)
        elif op == "open":
            sid, width, height, params, pixel_format = args
            session = stage.open_session(
                width=width, height=height, params=GenerationParams.model_validate(params), pixel_format=pixel_format
            )
            sessions[sid] = session
            channels = PIXEL_FORMATS[pixel_format].bytes_per_pixel
            blanks[sid] = np.zeros((height, width, channels), dtype=np.uint8)
        elif op == "rebalance":
            _rebalance(stage, sessions, args[0])
        else:
            sid, *rest = args
            if op == "push":
                rest = [blanks[sid]]
            _apply(sessions[sid], op, tuple(rest))
            if op == "close":
                del sessions[sid], blanks[sid]
