"""The compute loop: sessions, engine, pacing, stats, on one thread that sees only queues.

Each turn it takes what the IO thread queued (requests only it answers, acknowledged parameter changes, network
frames), applies changes whose prompt is ready, then moves frames: transport → engine session → pacer → output
thread → transport. When nothing is ready it waits on the inbox for a short, bounded time (a request or a network
frame wakes it at once; shared-memory input is polled at a fraction of the frame period: never a busy spin).

Frames move in passes, the mechanism of the deadline scheduler (``scheduler.py``, the policy): each pass stages
what the transports have, asks the scheduler for a plan (order, shared forwards, drops, mode switches), applies it
and runs the pushes; a group of sessions runs its chunks through shared DiT forwards (``engine.batch``). The
measured push times go back to the scheduler.

SIGTERM/SIGINT become a :class:`~.items.Shutdown` on the inbox; shutdown closes every session (rings marked closed
and unlinked), publishes ``state: "stopping"`` and stops the IO thread. A failure of the loop itself publishes the
dead sentinel (``state: "dead"`` with the reason) before the process exits non-zero.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import zmq

from ..config import DaemonConfig
from ..engine.interface import EngineFailure
from ..presets import PresetLibrary
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.messages import (
    TOPIC_DAEMON,
    TOPIC_EVENT,
    TOPIC_STATS,
    CacheInfo,
    DaemonBeat,
    Event,
    HelloReply,
    ListPresetsReply,
    SessionStats,
    StatusReply,
)
from . import faults
from .changes import ChangeQueue
from .directory import SessionDirectory
from .io_thread import IOThread
from .items import (
    InboundItem,
    IOFailed,
    LoopRequest,
    NetInput,
    NetInputError,
    ParamsChange,
    Publish,
    Reply,
    Shutdown,
)
from .loading import LoadingDesk, LoadProgress
from .ops import FrontDesk, LoopOps, cache_info, hello_reply, preset_infos
from .pacing import OutputThread
from .prompts import PromptWarmer
from .scheduler import DeadlineScheduler
from .session import Output, Session
from .stats import device_memory_mb
from .transports import InputFrame, NetTransport, SessionClosed

if TYPE_CHECKING:
    from ..engine.interface import Engine

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.25
_MAX_PASSES_PER_TURN = 8


class ComputeLoop:
    """The compute side. Only :meth:`run`'s thread touches sessions and the engine (outputs leave on the output
    thread, under its lock)."""

    def __init__(
        self,
        config: DaemonConfig,
        presets: PresetLibrary,
        *,
        on_stats: Callable[[StatusReply], None] | None = None,
        secret: str | None = None,
    ) -> None:
        self.config = config
        self.presets = presets
        self.on_stats = on_stats
        self.ctx = zmq.Context()
        self.inbox: queue.Queue[InboundItem] = queue.Queue()
        self.directory = SessionDirectory()
        self.io = IOThread(
            self.ctx, control=config.control, pub=config.pub, token=config.token, inbox=self.inbox,
            directory=self.directory, secret=secret if secret is not None else config.secret(),
        )  # fmt: skip
        self.outbox = self.io.outbox
        self.sessions: dict[str, Session] = {}
        self.output: OutputThread[Output] = OutputThread(self._release_output)
        self.ops = LoopOps(self)
        self.scheduler = DeadlineScheduler(batching=True)
        """The policy of :meth:`_move_frames`; ``scheduler.batching = False`` runs every session's forward alone."""
        self._held: dict[str, int] = {}
        """Sessions the last plan held for a batching partner, until when (ns): the loop sleeps, never spins."""
        self.started_ns = time.monotonic_ns()
        self.device = config.device or "cpu"
        self.model_name = config.model
        self.cache: CacheInfo | None = None
        self.compat: str | None = None
        self.parallel: str | None = None
        self.acceleration: str | None = None
        """How the engine spans several devices (``serve --gpus N``), for ``hello``; None: one device."""
        """``"upstream"`` or ``"clean"`` (``model.configs.check_compat``); known once the engine is attached."""
        """The engine's KV cache settings (``hello``, ``status``); known once the engine is attached."""
        self._engine: Engine | None = None
        self._warmer: PromptWarmer | None = None
        self._changes: ChangeQueue | None = None
        self._stopping: str | None = None
        self._fatal = False
        self._warmed_presets = -1
        """The stop is a failure (a dead thread): the dead sentinel, exit code 1."""
        self.loading = LoadProgress(config.model)
        """The model load's progress, answered by the IO thread until :meth:`attach_engine`."""
        self.interrupt_load: Callable[[], None] | None = None
        """Set by ``serve`` while it loads: stops the load (a ``shutdown`` request meanwhile)."""
        self._next_tick_ns = 0
        self._next_beat_ns = 0

    # ------------------------------------------------------------------ lifetime

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "attach_engine() first"
        return self._engine

    @property
    def warmer(self) -> PromptWarmer:
        assert self._warmer is not None, "attach_engine() first"
        return self._warmer

    def start(self) -> None:
        """Bind the sockets (READY handshake with the IO thread); raises OSError naming the address on failure."""
        self.io.start_and_wait()
        self.output.start()
        log.info("control on %s, pub on %s", self.io.bound_control, self.io.bound_pub)
        self.io.open_desk(
            LoadingDesk(
                progress=self.loading,
                hello=self._hello(),
                status=lambda: self.ops.status_reply([], device_memory_mb(None)),  # no torch import off the loader
                presets=self._presets_reply,
                submit=self.inbox.put,
                interrupt=lambda: self.interrupt_load() if self.interrupt_load is not None else None,
            )
        )

    def _presets_reply(self) -> ListPresetsReply:
        self.presets.refresh()
        return preset_infos(self.presets)

    def _hello(self) -> HelloReply:
        return hello_reply(
            config_token=bool(self.config.token),
            model=self.model_name,
            device=self.device if self._engine is not None else (self.config.device or "auto"),
            max_sessions=self.config.max_sessions,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            heartbeat_liveness=self.config.heartbeat_liveness,
            pub_address=self.io.bound_pub,
            cache=self.cache,
            compat=self.compat,
            security=self.io.auth.mechanism if self.io.auth is not None else "none",
            parallel=self.parallel,
            acceleration=self.acceleration,
        )

    def parallel_now(self) -> str | None:
        """How the engine spans several devices now (its block split may have changed since ``hello``)."""
        return getattr(self._engine, "parallel", None) if self._engine is not None else None

    def attach_engine(self, engine: Engine) -> None:
        """Use ``engine`` (loaded after the sockets were bound), start encoding the presets' prompts and open the
        IO thread's front desk: from here on requests are answered."""
        self._engine = engine
        self.device = str(engine.device)
        self.model_name = str(engine.model_name)
        self.cache = cache_info(engine.cache_policy)
        self.compat = str(engine.compat)
        self.parallel = getattr(engine, "parallel", None)
        self.acceleration = getattr(engine, "acceleration", None)
        self._warmer = PromptWarmer(engine)
        self._changes = ChangeQueue(
            self._warmer, on_applied=self._change_applied, on_refused=self._change_refused, on_broken=self._broken
        )
        self._warm_presets()
        self.io.open_desk(
            FrontDesk(hello=self._hello(), presets=self.presets, directory=self.directory, submit=self.inbox.put)
        )

    def _warm_presets(self) -> None:
        """Encode every preset's prompt in the background (again after the preset files changed)."""
        self._warmed_presets = self.presets.version
        for preset in list(self.presets.presets.values()):
            self.warmer.request(preset.prompt)

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def _handler(signum: int, _frame: FrameType | None) -> None:
            self.inbox.put(Shutdown(f"signal {signal.Signals(signum).name}"))

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    def run(self) -> int:
        """The compute loop; returns the process exit code (0 on an orderly shutdown)."""
        self.publish_beat("alive")
        try:
            while self._stopping is None:
                self._turn()
        except Exception as exc:  # noqa: BLE001 - a fatal error is reported, then the process exits
            log.exception("fatal error in the compute loop")
            self.shutdown(f"fatal: {type(exc).__name__}: {exc}", dead=True)
            return 1
        self.shutdown(self._stopping, dead=self._fatal)
        return 1 if self._fatal else 0

    def _turn(self) -> None:
        now = time.monotonic_ns()
        item: InboundItem | None
        try:
            item = self.inbox.get(timeout=self._wait_s(now))
        except queue.Empty:
            item = None
        while item is not None:
            self._handle(item)
            if self._stopping is not None:
                return
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None
        if self._changes:
            self._changes.run()
        self._move_frames()
        now = time.monotonic_ns()
        if now >= self._next_tick_ns:
            self._next_tick_ns = now + int(self.config.stats_interval_s * 1e9)
            self._tick(now)
        if now >= self._next_beat_ns:  # the daemon's own Paranoid Pirate heartbeat on PUB
            self._next_beat_ns = now + int(self.config.heartbeat_interval_s * 1e9)
            self.publish_beat("alive")

    def _wait_s(self, now: int) -> float:
        """How long the loop may sleep on the inbox: until the next tick, or, since shared-memory input has no
        notification, a fraction of the fastest polled session's frame period (at most 5 ms). Outputs do not need
        the loop: the output thread releases them."""
        deadline = min(self._next_tick_ns, self._next_beat_ns)
        for s in self.sessions.values():
            held = self._held.get(s.session_id)
            if held is not None and now < held and not s.transport.has_input():
                deadline = min(deadline, held)  # waits for a batching partner's frame (the poll below wakes it)
            elif s.failed or s.staged or s.transport.has_input():
                return 0.0
            if s.transport.polled():
                deadline = min(deadline, now + int(min(5e6, 1e9 / s.fps / 8)))
        return min(_IDLE_WAIT_S, max(0.0005, (deadline - now) / 1e9))

    # ------------------------------------------------------------------ inbox

    def _handle(self, item: InboundItem) -> None:
        if isinstance(item, LoopRequest):
            faults.check("loop")
            self._answer(item)
        elif isinstance(item, ParamsChange):
            session = self.sessions.get(item.session_id)
            if session is not None and self._changes is not None:
                self._changes.submit(session, item.changes, item.preset, item.lora)
        elif isinstance(item, NetInput):
            session = self.sessions.get(item.session_id)
            if session is not None and isinstance(session.transport, NetTransport):
                session.transport.received(InputFrame(item.pixels, item.timestamp_ns, item.received_ns))
        elif isinstance(item, NetInputError):
            session = self.sessions.get(item.session_id)
            if session is not None:
                session.counters.bad_frames += 1
                self.event("error", item.session_id, code="bad_request", message=item.message)
        elif isinstance(item, Shutdown):
            log.info("shutting down: %s", item.reason)
            self._stopping = item.reason
        elif isinstance(item, IOFailed):
            self._fatal = True
            self._stopping = item.reason
        else:
            log.error("unknown inbound item %r", item)

    def _answer(self, request: LoopRequest) -> None:
        msg = request.message
        try:
            body = self.ops.answer(msg)
        except ProtocolError as exc:
            self.outbox.put(Reply(request.envelope, msg.id, error=exc))
            return
        except Exception as exc:  # noqa: BLE001 - answer, log, keep serving
            log.exception("op %s failed", msg.op)
            error = ProtocolError(ErrorCode.INTERNAL, f"{msg.op} failed: {type(exc).__name__}: {exc}")
            self.outbox.put(Reply(request.envelope, msg.id, error=error))
            return
        self.outbox.put(Reply(request.envelope, msg.id, body=body))

    # ------------------------------------------------------------------ frames

    def _move_frames(self) -> None:
        """Passes of the deadline scheduler: stage inputs, plan, drop, switch modes, push (shared forwards where the
        plan groups sessions); outputs go to the output thread."""
        for _ in range(_MAX_PASSES_PER_TURN):
            for session in list(self.sessions.values()):
                if session.failed:
                    self.close_session(session, session.failed, code="internal")
                    continue
                if not self.scheduler.knows(session.session_id):
                    self.scheduler.adopt(session.session_id, session.slo)
                try:
                    session.stage_inputs()
                except SessionClosed as exc:
                    self.close_session(session, exc.reason, code=exc.code)
            plan = self.scheduler.plan(time.monotonic_ns(), [s.view() for s in self.sessions.values()])
            self._held = plan.held
            if not plan.groups:
                for sid, count in plan.drops.items():  # alignment drops of a pass that runs nothing
                    self.sessions[sid].drop_staged(count)
                break
            for sid, count in plan.drops.items():
                self.sessions[sid].drop_staged(count)
            for sid in plan.misses:
                self.sessions[sid].counters.late_in += 1
            for group in plan.groups:
                members = [self.sessions[sid] for sid in group if sid in self.sessions]
                for session in members:
                    if session.session_id in plan.switches:
                        self._guarded(session, partial(session.set_mode, plan.switches[session.session_id]))
                members = [s for s in members if s.session_id in self.sessions and s.staged]
                if len(members) > 1:
                    self._push_together(members)
                elif members:
                    self._push_alone(members[0])
            if not self.inbox.empty():
                break  # answer requests between passes

    def _guarded(self, session: Session, work: Callable[[], None]) -> bool:
        """Run one session's work; its failure closes that session only. True when it went through."""
        try:
            work()
            return True
        except SessionClosed as exc:
            self.close_session(session, exc.reason, code=exc.code)
        except EngineFailure:
            raise  # the engine is gone for every session: the compute loop ends the daemon
        except Exception as exc:  # noqa: BLE001 - one session's failure must not take the others down
            log.exception("session %s failed", session.session_id)
            self.close_session(session, f"engine failed: {type(exc).__name__}: {exc}", code="internal")
        return False

    def _push_alone(self, session: Session) -> None:
        frame = session.staged.popleft()
        view = session.view()
        mode = view.stream_batch

        def push() -> None:
            try:
                outputs = session.push(frame, guard=False)
            except ValueError as exc:
                session.counters.bad_frames += 1
                self.event("error", session.session_id, code="bad_params", message=f"bad frame: {exc}")
                return
            self.scheduler.observe(session.session_id, stream_batch=mode, push_ms=session.counters.push_ms)
            if view.runs_chunk and view.batch_key is not None:
                self.scheduler.observe_group(view.batch_key, 1, session.counters.push_ms)
            for out in outputs:
                self.output.submit(session.session_id, out, out.due_ns)

        self._guarded(session, push)

    def _push_together(self, members: list[Session]) -> None:
        """One push of each member, their chunks through shared DiT forwards (``engine.batch.run_together``)."""
        from ..engine.batch import run_together  # the engine's (torch): imported once the first group runs

        frames = [s.staged.popleft() for s in members]
        views = [s.view() for s in members]
        started = time.perf_counter()
        # the members' own engine (their equal batch keys name one): under --mode shard it is one of several
        engine = getattr(members[0].engine_session, "engine", self.engine)
        results = run_together(engine, [s.push_steps(f) for s, f in zip(members, frames, strict=True)])  # type: ignore[arg-type]
        total_ms = (time.perf_counter() - started) * 1e3
        self.scheduler.observe_group(views[0].batch_key, len(members), total_ms)
        for session, frame, view, result in zip(members, frames, views, results, strict=True):
            if isinstance(result, ValueError):
                session.counters.bad_frames += 1
                self.event("error", session.session_id, code="bad_params", message=f"bad frame: {result}")
                continue
            if isinstance(result, BaseException):
                log.error("session %s failed in a shared forward: %r", session.session_id, result)
                self.close_session(session, f"engine failed: {type(result).__name__}: {result}", code="internal")
                continue
            share = total_ms / len(members)  # each member's part of the shared time
            self.scheduler.observe(session.session_id, stream_batch=view.stream_batch, push_ms=share)

            def finish(s: Session = session, f: Any = frame, r: Any = result, ms: float = share) -> None:
                for out in s.pushed(f, r, ms, shared=len(members)):
                    self.output.submit(s.session_id, out, out.due_ns)

            self._guarded(session, finish)

    def _release_output(self, out: Output) -> None:
        """Output thread: one output is due. An unexpected failure is that session's: it is marked failed, and the
        compute loop closes it with the reason (the output thread itself keeps serving the others)."""
        try:
            faults.check("output")
            out.session.emit(out)
        except Exception as exc:  # noqa: BLE001 - confined to the session whose output failed
            log.exception("output of session %s failed", out.session.session_id)
            out.session.failed = f"output failed: {type(exc).__name__}: {exc}"

    # ------------------------------------------------------------------ changes

    def _change_applied(self, session: Session, preset: str | None) -> None:
        if preset is not None:
            self.event("preset_changed", session.session_id, preset=preset)
        else:
            self.event("params_changed", session.session_id, preset=session.preset, params=session.params.model_copy())

    def _change_refused(self, session: Session, message: str) -> None:
        assert self._changes is not None
        self.directory.reset(session.session_id, self._changes.planned(session), session.preset)
        self.event("error", session.session_id, code="bad_params", message=message)

    def _broken(self, session: Session, message: str) -> None:
        self.close_session(session, message, code="internal")

    # ------------------------------------------------------------------ periodic

    def session_stats(
        self, sessions: list[Session], now_ns: int, memory: dict[str, float | None]
    ) -> list[SessionStats]:
        """The figures of ``sessions``, with ``memory`` (``device_memory_mb``, read once for all of them)."""
        device_mb = memory["allocated_mb"] if memory["allocated_mb"] is not None else memory["rss_mb"]
        return [
            s.stats(
                now_ns, device_memory_mb=device_mb, pending_changes=self._changes.pending(s) if self._changes else 0
            )
            for s in sessions
        ]

    def _tick(self, now: int) -> None:
        for thread in (self.io, self.output):  # a thread that died without saying so must still stop the daemon
            if not thread.is_alive() and self._stopping is None:
                log.error("the %s thread died", thread.name)
                self._fatal = True
                self._stopping = f"the {thread.name} thread died"
                return
        if self._warmer is not None and self.presets.version != self._warmed_presets:
            self._warm_presets()
        timeout = self.config.heartbeat_timeout_s
        for session in list(self.sessions.values()):
            age = session.client_age_s(time.monotonic_ns(), self.directory.last_seen_ns(session.session_id))
            if age > timeout:
                self.close_session(
                    session, f"client silent for {age:.1f} s (heartbeat timeout {timeout:g} s)", event="client_lost"
                )
                continue
            try:
                session.transport.check()
            except SessionClosed as exc:
                self.close_session(session, exc.reason, code=exc.code)
            except Exception as exc:  # noqa: BLE001 - an unreadable transport is that session's problem only
                self.close_session(session, f"ring check failed: {type(exc).__name__}: {exc}", code="internal")
        memory = device_memory_mb(self.device)
        stats = self.session_stats(list(self.sessions.values()), now, memory)
        for entry in stats:
            self.outbox.put(Publish(TOPIC_STATS, entry))
        if self.on_stats is not None:
            try:
                self.on_stats(self.ops.status_reply(stats, memory))
            except Exception:  # noqa: BLE001 - the UI must never stop the daemon
                log.exception("stats view failed; disabling it")
                self.on_stats = None

    # ------------------------------------------------------------------ closing

    def close_session(
        self, session: Session, reason: str, *, code: str | None = None, event: str | None = None
    ) -> None:
        if self.sessions.pop(session.session_id, None) is None:
            return
        self.scheduler.forget(session.session_id)
        self.directory.remove(session.session_id)
        with self.output.lock:  # no output is being written while the transport goes away
            self.output.forget(session.session_id)
            session.close()
        level = logging.WARNING if code else logging.INFO
        log.log(level, "session %s closed: %s", session.session_id, reason)
        self.event(event or ("error" if code else "session_closed"), session.session_id, code=code, message=reason)
        if code and event is None:
            self.event("session_closed", session.session_id, code=code, message=reason)

    def shutdown(self, reason: str, *, dead: bool) -> None:
        """Close every session, publish the last beat, stop the threads and the ZeroMQ context."""
        for session in list(self.sessions.values()):
            try:
                self.close_session(session, f"daemon stopping ({reason})", event="session_closed")
            except Exception:  # noqa: BLE001 - keep closing the others
                log.exception("closing session %s", session.session_id)
        self.publish_beat("dead" if dead else "stopping", message=reason)
        if self._warmer is not None:
            self._warmer.close()
        self.output.stop()
        self.io.stop()
        log.debug("IO thread stopped (alive=%s)", self.io.is_alive())
        self.ctx.term()

    # ------------------------------------------------------------------ PUB

    def event(self, event: str, session_id: str | None = None, **fields: Any) -> None:
        self.outbox.put(Publish(TOPIC_EVENT, Event(event=event, session_id=session_id, **fields)))

    def publish_beat(self, state: Literal["alive", "stopping", "dead"], message: str | None = None) -> None:
        beat = DaemonBeat(
            state=state,
            pid=os.getpid(),
            uptime_s=round((time.monotonic_ns() - self.started_ns) / 1e9, 2),
            sessions=len(self.sessions),
            message=message,
        )
        self.outbox.put(Publish(TOPIC_DAEMON, beat))
