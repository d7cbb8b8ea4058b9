"""A session: one client stream, with its engine session, its frame transport, its pacer and its counters.

The compute loop takes an input from the transport, pushes it through the engine session, and hands the outputs
to the pacer's output thread, which lets them leave at the source rate through the same transport. The session
never asks which kind of transport it has (``transports.py``).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Generator, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..protocol.messages import SessionInfo, SessionStats
from ..protocol.params import GenerationParams
from .pacing import DEFAULT_QUEUE_LIMIT, Pacer, queue_limit
from .scheduler import SessionView, deadline_s
from .slo import SloGuard
from .stats import SessionCounters
from .transports import BadInput, FrameTransport, InputFrame, TransportError

if TYPE_CHECKING:
    from ..engine.interface import EngineSession, OutputFrame

log = logging.getLogger(__name__)

_PLAUSIBLE_CLOCK_NS = 60 * 10**9
"""A capture timestamp within this of the daemon's monotonic clock is taken to share it (same machine)."""
_MAX_TRACKED_CAPTURES = 4096
MAX_STAGED = 32
"""Most input frames a live session holds outside its ring (memory: at 1080p BGRA 32 frames are 265 MB)."""


def new_session_id() -> str:
    return secrets.token_hex(6)


@dataclass(frozen=True)
class Output:
    """One restyled frame scheduled to leave at ``due_ns``; ``gap_ns`` and ``queue_limit`` are its session's lane
    settings in the output thread (``pacing.OutputThread``), which calls :meth:`dropped` if it never leaves."""

    session: Session
    index: int
    pixels: np.ndarray
    capture_ns: int
    arrival_ns: int
    due_ns: int
    late: bool
    gap_ns: int = 0
    queue_limit: int = DEFAULT_QUEUE_LIMIT

    def dropped(self) -> None:
        """The output thread dropped this output (its session's lane was full: newest wins)."""
        self.session.paced_dropped += 1

    def blocked(self) -> bool:
        """Offline, the output waits for room at the reader instead of overrunning it (live: newest wins)."""
        return self.session.pacing == "offline" and not self.session.closed and not self.session.transport.has_room()


class Session:
    """One open session (compute thread, except :meth:`emit` on the output thread)."""

    def __init__(
        self,
        session_id: str,
        *,
        width: int,
        height: int,
        fps: float,
        pixel_format: str,
        client: str | None,
        engine_session: EngineSession,
        transport: FrameTransport,
        preset: str | None,
        pacing: Literal["live", "offline"] = "live",
        frame_memory: int = 0,
    ) -> None:
        self.session_id = session_id
        self.pacing = pacing
        """live: outputs leave paced at the source rate; offline: as soon as ready, every input in order."""
        self.frame_memory = frame_memory
        """Bytes this session's frames may hold at worst (``transports.frame_memory_bytes``), for the budget."""
        self.width = width
        self.height = height
        self.fps = fps
        self.pixel_format = pixel_format
        self.client = client
        self.engine_session = engine_session
        self.transport = transport
        self.preset = preset
        self.opened_ns = time.monotonic_ns()
        self.prefers_stream_batch = bool(engine_session.params.stream_batch)
        self.slo = SloGuard()
        self.counters = SessionCounters(fps_target=fps)
        self.pacer = Pacer(fps)
        self.paced_dropped = 0
        """Outputs the output thread dropped because this session's lane was full (part of ``dropped_out``)."""
        self.failed: str | None = None
        """Set by the output thread when an output cannot be delivered; the compute loop closes the session."""
        self.closed = False
        self.staged: deque[InputFrame] = deque()
        """Input frames taken from the transport, waiting for the scheduler (``scheduler.py``), oldest first."""
        self.shared_forward = 0
        """How many sessions shared this session's last chunk's DiT forward (1: alone; 0: none ran yet)."""
        self._captures: dict[int, tuple[int, int]] = {}
        self._pushed = 0
        self._out_seq = 0

    @property
    def kind(self) -> Literal["shm", "net"]:
        return self.transport.kind

    @property
    def params(self) -> GenerationParams:
        return self.engine_session.params

    def client_age_s(self, now_ns: int, last_message_ns: int) -> float:
        """Seconds since the client's last sign of life: ``last_message_ns`` (its last control message or network
        frame, as the session directory recorded it) or a heartbeat it left in the transport (the rings)."""
        newest = max(last_message_ns, self.transport.client_heartbeat_ns())
        return max(0.0, (now_ns - newest) / 1e9)

    # ------------------------------------------------------------------ engine (compute loop)

    def take_input(self) -> InputFrame | None:
        """The next input frame, or None; a frame the transport refuses is counted as bad and skipped."""
        try:
            return self.transport.take()
        except BadInput:
            self.counters.bad_frames += 1
            return None

    # ------------------------------------------------------------------ the scheduler's view (compute loop)

    @property
    def staging_limit(self) -> int:
        """Most frames staged at once: offline one (the ring holds the rest, the client waits for room), live as many
        as arrive within a frame's deadline (older ones would be dropped anyway), at most ``MAX_STAGED`` (the ring
        holds the rest and drops its oldest beyond: ``dropped_in``)."""
        if self.pacing == "offline":
            return 1
        return min(MAX_STAGED, math.floor(deadline_s(self.fps) * self.fps) + 1)

    def stage_inputs(self) -> None:
        """Take what the transport has, up to :attr:`staging_limit` staged frames."""
        while len(self.staged) < self.staging_limit:
            frame = self.take_input()
            if frame is None:
                if not self.transport.has_input():
                    return
                continue  # a bad frame, counted: the next one
            self.staged.append(frame)

    def drop_staged(self, count: int) -> None:
        """The scheduler drops the ``count`` oldest staged frames: they could no longer meet their deadline."""
        for _ in range(min(count, len(self.staged))):
            self.staged.popleft()
            self.counters.dropped_late += 1

    def batch_key(self) -> Hashable | None:
        """Sessions with equal keys may share one DiT forward (``None``: this engine session cannot)."""
        key = getattr(self.engine_session, "batch_key", None)
        return key() if callable(key) and hasattr(self.engine_session, "push_steps") else None

    def view(self) -> SessionView:
        """What the scheduler sees of this session now."""
        params = self.engine_session.params
        runs_chunk = bool(getattr(self.engine_session, "runs_chunk_next", False))
        return SessionView(
            session_id=self.session_id,
            fps=self.fps,
            arrivals_ns=tuple(f.arrival_ns for f in self.staged),
            live=self.pacing == "live",
            wants_stream_batch=self.prefers_stream_batch and params.steps > 1,
            stream_batch=bool(params.stream_batch),
            batch_key=self.batch_key(),
            runs_chunk=runs_chunk,
            frames_to_chunk=getattr(self.engine_session, "frames_to_chunk", None),
        )

    def set_mode(self, stream_batch: bool) -> None:
        """The scheduler's mode switch: the stream batch, or no-batch mode (drains the pipeline: no frame is lost)."""
        if stream_batch == self.engine_session.params.stream_batch:
            return
        self.engine_session.set_params(stream_batch=stream_batch)
        what = (
            "stream batch again (waits back under the SLO)" if stream_batch else "no-batch mode (frames waited >= SLO)"
        )
        log.info("session %s: %s", self.session_id, what)

    # ------------------------------------------------------------------ pushes

    def push(self, frame: InputFrame, *, guard: bool = True) -> list[Output]:
        """Push one input frame; returns the outputs that became ready, each with its due time.
        Raises ValueError for a frame the engine refuses (the caller counts it as bad). ``guard=False``: the mode
        is the scheduler's choice (the compute loop), not this session's own SLO guard."""
        if guard and self.pacing == "live":
            self._guard_slo(frame.arrival_ns)  # offline, waiting is expected: keep the stream batch
        chunk = bool(getattr(self.engine_session, "runs_chunk_next", True))
        started = time.perf_counter()
        outputs = self.engine_session.push(frame.pixels)
        push_ms = (time.perf_counter() - started) * 1e3
        return self.pushed(frame, outputs, push_ms, shared=1 if chunk else 0)

    def push_steps(self, frame: InputFrame) -> Generator[Any, Any, list[OutputFrame]]:
        """The engine session's steps for ``frame`` (``StreamSession.push_steps``), to run batched with other
        sessions' (``engine.batch.run_together``); then :meth:`pushed` with the result."""
        return self.engine_session.push_steps(frame.pixels)  # type: ignore[attr-defined]

    def pushed(self, frame: InputFrame, outputs: list[OutputFrame], push_ms: float, *, shared: int) -> list[Output]:
        """Bookkeeping after the engine took ``frame`` (its chunk ran alone, ``shared=1``, or in forwards ``shared``
        sessions shared; ``0``: it only buffered the frame): counters, and the outputs that became ready with their
        due times."""
        index = self._pushed
        if shared:
            self.shared_forward = shared
        if shared > 1:
            self.counters.shared_chunks += 1
        self._pushed += 1
        self.counters.frame_in(frame.arrival_ns)
        self._captures[index] = (frame.capture_ns, frame.arrival_ns)
        ready_ns = time.monotonic_ns()
        self.counters.engine_step(push_ms, self.engine_session.stage_ms, len(outputs))
        scheduled = []
        live = self.pacing == "live"
        gap = self.pacer.gap_ns if live else 0
        for out in outputs:
            capture, arrival = self._captures.pop(out.index, (frame.capture_ns, frame.arrival_ns))
            due, late = self.pacer.schedule(arrival_ns=arrival, ready_ns=ready_ns) if live else (ready_ns, False)
            # Live outputs wait out the latency target: the lane holds that many, plus two chunks.
            limit = queue_limit(self.pacer.target_ns, self.fps) if live else DEFAULT_QUEUE_LIMIT
            scheduled.append(Output(self, out.index, out.pixels, capture, arrival, due, late, gap, limit))
        if len(self._captures) > _MAX_TRACKED_CAPTURES:  # outputs the engine will never give: stay bounded anyway
            for stale in sorted(self._captures)[: -_MAX_TRACKED_CAPTURES // 4]:
                del self._captures[stale]
        return scheduled

    def _guard_slo(self, arrival_ns: int) -> None:
        """Fall back to no-batch mode while frames wait too long, back to the stream batch when calm (``slo.py``)."""
        now = time.monotonic_ns()
        params = self.engine_session.params
        wants = self.prefers_stream_batch and params.steps > 1
        switch = self.slo.observe(wait_s=(now - arrival_ns) / 1e9, now_s=now / 1e9, wants_stream_batch=wants)
        if switch is not None:
            self.set_mode(switch)

    # ------------------------------------------------------------------ output (output thread, under its lock)

    def emit(self, out: Output) -> None:
        """Deliver one due output; a failure marks the session ``failed`` for the compute loop to close."""
        if self.closed or self.failed:
            return
        self._out_seq += 1
        try:
            self.transport.deliver(self._out_seq, out.pixels, out.capture_ns)
        except TransportError as exc:
            self.failed = str(exc)
            return
        now = time.monotonic_ns()
        since = out.capture_ns if 0 <= now - out.capture_ns < _PLAUSIBLE_CLOCK_NS else out.arrival_ns
        self.counters.frame_out(now, now - since, out.late)

    # ------------------------------------------------------------------ teardown and reports

    def close(self) -> None:
        """Let go of the transport (rings marked closed and unlinked). Hold the output thread's lock."""
        self.closed = True
        self.transport.close()
        self._captures.clear()
        release = getattr(self.engine_session, "close", None)  # optional (the relay's remote sessions have one)
        if release is not None:
            release()

    def info(self) -> SessionInfo:
        """The session's identity and geometry (``open_session`` replies)."""
        input_ring, output_ring = self.transport.ring_names()
        return SessionInfo(
            session_id=self.session_id,
            transport=self.kind,
            width=self.width,
            height=self.height,
            fps=self.fps,
            pixel_format=self.pixel_format,
            input_ring=input_ring,
            output_ring=output_ring,
            latency_frames=int(self.engine_session.latency_frames),
            pacing=self.pacing,
            preset=self.preset,
            params=self.params.model_copy(),
        )

    def stats(self, now_ns: int, *, device_memory_mb: float | None, pending_changes: int) -> SessionStats:
        """The session's figures (PUB ``stats`` and ``status`` entries)."""
        snap = self.counters.snapshot(now_ns)
        snap = snap._replace(bad_frames=snap.bad_frames + self.transport.unreported_bad_frames())
        steps = self.params.steps
        return SessionStats(
            **self.info().model_dump(),
            **snap._asdict(),  # the counters carry the wire's field names
            client=self.client,
            uptime_s=round((now_ns - self.opened_ns) / 1e9, 2),
            dropped_in=self.transport.dropped_in(),
            dropped_out=self.transport.dropped_out() + self.paced_dropped,
            step_ms=round(snap.stage_ms["dit"] / max(1, steps), 3) if "dit" in snap.stage_ms else None,
            target_latency_ms=round(self.pacer.target_latency_ms, 2),
            device_memory_mb=device_memory_mb,
            steps=steps,
            pending_changes=pending_changes,
            engine_frames_in=int(self.engine_session.frames_in),
            engine_frames_out=int(self.engine_session.frames_out),
            mode="stream_batch" if self.params.stream_batch and steps > 1 else "no_batch",
            shared_forward=self.shared_forward,
            slo_switches=self.slo.switches,
        )
