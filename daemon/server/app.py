"""`sdlive serve`: the daemon process. A thin process wrapper around the engine, after vLLM's EngineCoreProc.

* The **IO thread** (``io.py``) owns every socket: ROUTER (control), PUB (stats, events, daemon heartbeat) and the
  network sessions' PULL/PUSH. It answers bad requests itself and puts good ones on the inbound queue.
* The **compute loop** (:meth:`Daemon.run`, on the main thread) sees only queues. Each turn it takes the queued
  requests, then moves frames: input ring / network inbox → engine session → pacer → output ring / network. When
  nothing is ready it waits on the queue for a short, bounded time (a request or a network frame wakes it at once;
  shared-memory input is polled at a fraction of the frame period: never a busy spin).
* SIGTERM/SIGINT become a :class:`~.io.Shutdown` on the queue; shutdown closes every session (rings marked closed
  and unlinked), publishes ``state: "stopping"`` and stops the IO thread through its inproc PAIR. A failure of the
  loop itself publishes the dead sentinel (``state: "dead"`` with the reason) before the process exits non-zero.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..config import DaemonConfig
from ..presets import PresetLibrary, load_presets
from ..protocol.constants import PIXEL_FORMATS
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.messages import PROTOCOL_VERSION, TOPIC_DAEMON, TOPIC_EVENT, TOPIC_STATS
from ..protocol.ring import RingError
from . import io as sio
from .pacing import OutputThread
from .sessions import Output, Session, SessionClosed, new_session_id, sweep_stale_rings
from .stats import device_memory_mb

log = logging.getLogger(__name__)

try:
    from importlib.metadata import version as _pkg_version

    DAEMON_VERSION = _pkg_version("sdlive")
except Exception:  # noqa: BLE001 - running from a source tree
    DAEMON_VERSION = "0.0.0+local"

_IDLE_WAIT_S = 0.25
_MAX_PUSHES_PER_TURN = 8


class PromptWarmer:
    """Encodes prompts on a worker thread so a preset switch never stalls the streams.

    The first encode of a prompt can take seconds (the text encoder loads; on CPU it is slow); the engine keeps
    the result in memory and on disk, after which ``set_params`` with that prompt is instant. A switch to a prompt
    not encoded yet is applied by the compute loop once the worker is done (see ``Daemon._apply_deferred``).
    Every use of the text encoder, here or on the compute thread, holds :attr:`lock`.
    """

    def __init__(self, engine: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.engine = engine
        self.lock = threading.RLock()
        self._ready: set[str] = set()
        self._pending: dict[str, Any] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdlive-prompts")

    def is_ready(self, prompt: str) -> bool:
        return prompt in self._ready

    def failed(self, prompt: str) -> BaseException | None:
        future = self._pending.get(prompt)
        if future is not None and future.done() and future.exception() is not None:
            self._pending.pop(prompt, None)
            return future.exception()
        return None

    def request(self, prompt: str) -> None:
        if prompt not in self._ready and prompt not in self._pending:
            self._pending[prompt] = self._executor.submit(self._encode, prompt)

    def encode_now(self, prompt: str) -> None:
        self._encode(prompt)

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


class Daemon:
    """The compute side: sessions, engine, pacing, stats. Only :meth:`run`'s thread touches it."""

    def __init__(
        self,
        config: DaemonConfig,
        engine: Any,
        presets: PresetLibrary,
        *,
        on_stats: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.engine: Any = None
        self.presets = presets
        self.on_stats = on_stats
        self.ctx = zmq.Context()
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.io = sio.IOThread(
            self.ctx,
            control=config.control,
            pub=config.pub,
            token=config.token,
            inbox=self.inbox,
            max_message_bytes=config.max_message_bytes,
        )
        self.sessions: dict[str, Session] = {}
        self.output = OutputThread(self._release_output)
        self.started_ns = time.monotonic_ns()
        self.device = str(getattr(engine, "device", config.device or "cpu"))
        self.model_name = str(getattr(engine, "model_name", config.model))
        self._stopping: str | None = None
        self._next_tick_ns = 0
        self._next_beat_ns = 0
        self._net_host = self._host_for_net(config.control)
        self.warmer: PromptWarmer | None = None
        self._deferred: list[tuple[Session, str, dict[str, Any], str | None]] = []
        if engine is not None:
            self.attach_engine(engine)

    def attach_engine(self, engine: Any) -> None:
        """Use ``engine`` (loaded after the sockets were bound) and start encoding the presets' prompts."""
        self.engine = engine
        self.device = str(getattr(engine, "device", self.config.device or "cpu"))
        self.model_name = str(getattr(engine, "model_name", self.config.model))
        self.warmer = PromptWarmer(engine)
        self.io.static_replies = {"hello": self._op_hello(None), "list_presets": self._op_list_presets(None)}
        for name in self.presets.names():
            self.warmer.request(self.presets.presets[name].prompt)

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        """Bind the sockets (READY handshake with the IO thread); raises OSError naming the address on failure."""
        self.io.start_and_wait()
        self.output.start()
        log.info("control on %s, pub on %s", self.io.bound_control, self.io.bound_pub)

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def _handler(signum: int, _frame: Any) -> None:
            self.inbox.put(sio.Shutdown(f"signal {signal.Signals(signum).name}"))

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    def run(self) -> int:
        """The compute loop; returns the process exit code (0 on an orderly shutdown)."""
        self._publish_daemon("alive")
        try:
            while self._stopping is None:
                self._turn()
        except Exception as exc:  # noqa: BLE001 - a fatal error is reported, then the process exits
            log.exception("fatal error in the compute loop")
            self._shutdown(f"fatal: {type(exc).__name__}: {exc}", dead=True)
            return 1
        dead = self._stopping.startswith("IO thread failed")
        self._shutdown(self._stopping, dead=dead)
        return 1 if dead else 0

    def _turn(self) -> None:
        now = time.monotonic_ns()
        try:
            item = self.inbox.get(timeout=self._wait_s(now))
        except queue.Empty:
            item = None
        while item is not None:
            self._handle_item(item)
            if self._stopping is not None:
                return
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None
        if self._deferred:
            self._apply_deferred()
        self._move_frames()
        now = time.monotonic_ns()
        if now >= self._next_tick_ns:
            self._next_tick_ns = now + int(self.config.stats_interval_s * 1e9)
            self._tick(now)
        if now >= self._next_beat_ns:  # the daemon's own Paranoid Pirate heartbeat on PUB
            self._next_beat_ns = now + int(self.config.heartbeat_interval_s * 1e9)
            self._publish_daemon("alive")

    def _wait_s(self, now: int) -> float:
        """How long the loop may sleep on the queue (a request or a network frame wakes it at once): until the next
        tick, or, since shared-memory input has no notification, a fraction of the fastest session's frame period
        (at most 5 ms). Outputs do not need the loop: the output thread releases them."""
        deadline = min(self._next_tick_ns, self._next_beat_ns)
        for s in self.sessions.values():
            if s.failed:
                return 0.0
            if s.in_ring is not None:
                if s.has_input():
                    return 0.0
                deadline = min(deadline, now + int(min(5e6, 1e9 / s.fps / 8)))
            elif s.inbox:
                return 0.0
        return min(_IDLE_WAIT_S, max(0.0005, (deadline - now) / 1e9))

    # ------------------------------------------------------------------ frames

    def _move_frames(self) -> None:
        """Round-robin over sessions, one input per session per pass; outputs go to the output thread."""
        for _ in range(_MAX_PUSHES_PER_TURN):
            pushed = False
            for session in list(self.sessions.values()):
                if session.failed:
                    self._close_session(session, session.failed, code="internal")
                    continue
                try:
                    got = session.take_input()
                    if got is None:
                        continue
                    pixels, capture_ns, arrival_ns = got
                    try:
                        outputs = session.push(pixels, capture_ns, arrival_ns)
                    except ValueError as exc:
                        session.stats.bad_frames += 1
                        self._event("error", session.session_id, code="bad_params", message=f"bad frame: {exc}")
                        continue
                    for out in outputs:
                        self.output.submit(session.session_id, out, out.due_ns)
                    pushed = True
                except SessionClosed as exc:
                    self._close_session(session, exc.reason, code=exc.code)
                except Exception as exc:  # noqa: BLE001 - one session's failure must not take the others down
                    log.exception("session %s failed", session.session_id)
                    self._close_session(session, f"engine failed: {type(exc).__name__}: {exc}", code="internal")
            if not pushed:
                break
            if not self.inbox.empty():
                break  # answer requests between frames

    def _release_output(self, out: Output) -> None:
        """Output thread: one output is due."""
        out.session.emit(out, self._send_net)

    def _send_net(self, session: Session, seq: int, out: Output) -> None:
        self.io.outbox.put(
            sio.NetOutput(
                session.session_id,
                seq,
                out.capture_ns,
                out.pixels,
                session.pixel_format,
                session.encoding,
                session.jpeg_quality,
            )
        )

    # ------------------------------------------------------------------ periodic

    def _tick(self, now: int) -> None:
        timeout = self.config.heartbeat_timeout_s
        for session in list(self.sessions.values()):
            session.seen(self.io.last_seen.get(session.session_id, 0))
            age = session.client_age_s(time.monotonic_ns())
            if age > timeout:
                self._close_session(
                    session,
                    f"client silent for {age:.1f} s (heartbeat timeout {timeout:g} s)",
                    event="client_lost",
                )
                continue
            try:
                session.check_rings()
            except SessionClosed as exc:
                self._close_session(session, exc.reason, code=exc.code)
            except Exception as exc:  # noqa: BLE001 - an unreadable ring is that session's problem only
                self._close_session(session, f"ring check failed: {type(exc).__name__}: {exc}", code="internal")
        stats = [self._session_stats(s, now) for s in self.sessions.values()]
        for entry in stats:
            self._publish(TOPIC_STATS, entry)
        if self.on_stats is not None:
            try:
                self.on_stats(self._status_body(stats))
            except Exception:  # noqa: BLE001 - the UI must never stop the daemon
                log.exception("stats view failed; disabling it")
                self.on_stats = None

    # ------------------------------------------------------------------ requests

    def _handle_item(self, item: Any) -> None:
        if isinstance(item, sio.Request):
            self._on_request(item)
        elif isinstance(item, sio.NetInput):
            session = self.sessions.get(item.session_id)
            if session is not None:
                session.net_received(item.seq, item.timestamp_ns, item.pixels, item.received_ns)
        elif isinstance(item, sio.NetInputError):
            session = self.sessions.get(item.session_id)
            if session is not None:
                session.stats.bad_frames += 1
                session.seen()
                self._event("error", item.session_id, code="bad_request", message=item.message)
        elif isinstance(item, sio.Shutdown):
            log.info("shutting down: %s", item.reason)
            self._stopping = item.reason
        elif isinstance(item, sio.IOFailed):
            self._stopping = item.reason
        else:
            log.error("unknown inbound item %r", item)

    def _on_request(self, request: sio.Request) -> None:
        msg = request.message
        handler = getattr(self, f"_op_{msg.op}", None)
        session_id = getattr(msg, "session_id", None)
        if session_id is not None and session_id in self.sessions:
            self.sessions[session_id].seen(request.received_ns)
        try:
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_OP, f"op {msg.op!r} is not served by this daemon")
            body = handler(msg)
        except ProtocolError as exc:
            exc.id = msg.id
            self.io.outbox.put(sio.Reply(request.envelope, error=exc))
            return
        except Exception as exc:  # noqa: BLE001 - answer, log, keep serving
            log.exception("op %s failed", msg.op)
            error = ProtocolError(ErrorCode.INTERNAL, f"{msg.op} failed: {type(exc).__name__}: {exc}", id=msg.id)
            self.io.outbox.put(sio.Reply(request.envelope, error=error))
            return
        self.io.outbox.put(sio.Reply(request.envelope, body={"id": msg.id, **body}))

    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            known = ", ".join(self.sessions) or "none open"
            raise ProtocolError(
                ErrorCode.UNKNOWN_SESSION,
                f"no session {session_id!r} (open sessions: {known}); it may have timed out: open a new one",
            )
        return session

    def _capabilities(self) -> dict[str, Any]:
        return {
            "transports": ["shm", "net"],
            "pixel_formats": list(PIXEL_FORMATS),
            "encodings": ["raw", "jpeg"],
            "max_sessions": self.config.max_sessions,
            "ring_version": 1,
        }

    def _op_hello(self, msg: Any) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "daemon_version": DAEMON_VERSION,
            "model": self.model_name,
            "device": self.device,
            "capabilities": self._capabilities(),
            "auth_required": bool(self.config.token),
            "heartbeat_interval_s": self.config.heartbeat_interval_s,
            "heartbeat_liveness": self.config.heartbeat_liveness,
            "pub_address": self.io.bound_pub,
            "pid": os.getpid(),
        }

    def _op_list_presets(self, msg: Any) -> dict[str, Any]:
        shipped = str(self.presets.dirs[0]) if self.presets.dirs else None
        presets = []
        for index, name in enumerate(self.presets.names()):
            p = self.presets.presets[name]
            source = "shipped" if shipped and p.source and p.source.startswith(shipped) else p.source
            presets.append({**p.summary(), "index": index, "source": source})
        problems = [str(problem) for problem in self.presets.problems]
        return {"presets": presets, "problems": problems}

    def _op_heartbeat(self, msg: Any) -> dict[str, Any]:
        if msg.session_id is not None:
            self._session(msg.session_id)
        return {"session_id": msg.session_id}

    def _op_shutdown(self, msg: Any) -> dict[str, Any]:
        self.inbox.put(sio.Shutdown("shutdown requested"))
        return {"stopping": True}

    def _op_status(self, msg: Any) -> dict[str, Any]:
        now = time.monotonic_ns()
        if msg.session_id is not None:
            stats = [self._session_stats(self._session(msg.session_id), now)]
        else:
            stats = [self._session_stats(s, now) for s in self.sessions.values()]
        return self._status_body(stats)

    def _status_body(self, stats: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "daemon_version": DAEMON_VERSION,
            "model": self.model_name,
            "device": self.device,
            "uptime_s": round((time.monotonic_ns() - self.started_ns) / 1e9, 2),
            "max_sessions": self.config.max_sessions,
            "control_address": self.io.bound_control,
            "pub_address": self.io.bound_pub,
            "presets": len(self.presets),
            "memory": device_memory_mb(self.device),
            "requests": dict(self.io.counters),
            "sessions": stats,
        }

    def _session_stats(self, session: Session, now: int) -> dict[str, Any]:
        snap = session.stats.snapshot(now)
        stage = snap["step_ms"]
        steps = session.engine_session.params.steps
        memory = device_memory_mb(self.device)
        device_mb = memory["allocated_mb"] if memory["allocated_mb"] is not None else memory["rss_mb"]
        return {
            **session.describe(),
            "fps_in": snap["fps_in"],
            "fps_out": snap["fps_out"],
            "latency_ms_p50": snap["latency_ms"]["p50"],
            "latency_ms_p95": snap["latency_ms"]["p95"],
            "latency_ms_p99": snap["latency_ms"]["p99"],
            "jitter_ms": snap["jitter_ms"],
            "frames_in": snap["frames_in"],
            "frames_out": snap["frames_out"],
            "dropped_in": snap["dropped_in"],
            "dropped_out": snap["dropped_out"] + self.io.net_dropped(session.session_id),
            "deadline_misses": snap["deadline_misses"],
            "bad_frames": snap["bad_frames"],
            "step_ms": round(stage["dit"] / max(1, steps), 3) if "dit" in stage else None,
            "stage_ms": stage,
            "push_ms": snap["push_ms"],
            "target_latency_ms": round(session.pacer.target_latency_ms, 2),
            "device_memory_mb": device_mb,
            "steps": steps,
            "params": session.params(),
            "pending_changes": sum(1 for s, *_ in self._deferred if s is session),
            "engine_frames_in": int(getattr(session.engine_session, "frames_in", session.frames_pushed)),
            "engine_frames_out": int(getattr(session.engine_session, "frames_out", snap["frames_out"])),
            "ts": time.time(),
        }

    def _op_open_session(self, msg: Any) -> dict[str, Any]:
        if len(self.sessions) >= self.config.max_sessions:
            raise ProtocolError(
                ErrorCode.CAPACITY,
                f"the daemon already serves {len(self.sessions)} sessions (max_sessions={self.config.max_sessions}): "
                "close one, or start the daemon with a higher --max-sessions",
            )
        preset_name = msg.preset or self.config.default_preset or (self.presets.names()[0] if len(self.presets) else None)
        params: dict[str, Any] = {}
        if preset_name is not None:
            params.update(self._preset(preset_name).params())
        if msg.params is not None:
            params.update(msg.params.changes())
        from ..engine import SessionParams

        try:
            session_params = SessionParams(**params)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"open_session: {_pydantic_message(exc)}") from None
        session_id = new_session_id()
        assert self.warmer is not None
        try:
            with self.warmer.lock:  # the session encodes its prompt: no concurrent text-encoder use
                engine_session = self.engine.open_session(
                    width=msg.width, height=msg.height, params=session_params, pixel_format=msg.pixel_format
                )
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"open_session: {exc}") from None
        except (MemoryError, RuntimeError) as exc:
            if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
                raise ProtocolError(ErrorCode.CAPACITY, f"not enough device memory for another session: {exc}") from None
            raise
        session = Session(
            session_id=session_id,
            width=msg.width,
            height=msg.height,
            fps=float(msg.fps),
            pixel_format=msg.pixel_format,
            transport=msg.transport,
            client=msg.client,
            engine_session=engine_session,
            preset=preset_name,
            ring_slots=self.config.ring_slots,
            encoding=msg.encoding,
        )
        reply: dict[str, Any] = {}
        if msg.transport == "shm":
            try:
                session.in_ring, session.out_ring = Session.create_rings(
                    session_id, width=msg.width, height=msg.height, pixel_format=msg.pixel_format,
                    slots=self.config.ring_slots,
                )
            except (RingError, OSError) as exc:
                raise ProtocolError(ErrorCode.INTERNAL, f"cannot create the session's shared memory: {exc}") from None
            reply.update(input_ring=session.in_ring.name, output_ring=session.out_ring.name, slots=self.config.ring_slots)
        else:
            reply["net"] = self._open_net(session)
        self.sessions[session_id] = session
        self.io.session_ids.add(session_id)
        log.info(
            "session %s opened: %dx%d %s @ %g fps, %s, preset %s, client %s",
            session_id, msg.width, msg.height, msg.pixel_format, msg.fps, msg.transport, preset_name, msg.client,
        )
        self._event("session_opened", session_id, preset=preset_name)
        return {
            "session_id": session_id,
            "transport": msg.transport,
            "width": msg.width,
            "height": msg.height,
            "fps": float(msg.fps),
            "pixel_format": msg.pixel_format,
            **reply,
            "latency_frames": session.latency_frames,
            "preset": preset_name,
            "params": session.params(),
            "heartbeat_interval_s": self.config.heartbeat_interval_s,
            "heartbeat_liveness": self.config.heartbeat_liveness,
        }

    @staticmethod
    def _host_for_net(control: str) -> str:
        if control.startswith("tcp://"):
            return control[len("tcp://") :].rsplit(":", 1)[0]
        return "127.0.0.1"

    def _open_net(self, session: Session) -> dict[str, Any]:
        """Bind the session's PULL (frames in) and PUSH (frames out) on ephemeral ports, then hand them to the IO
        thread (a socket may move between threads with a memory barrier: the queue is one)."""
        pull = self.ctx.socket(zmq.PULL)
        push = self.ctx.socket(zmq.PUSH)
        for sock in (pull, push):
            sock.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 4 * self.config.ring_slots)
        pull.setsockopt(zmq.MAXMSGSIZE, session.width * session.height * 4 + 65536)
        push.setsockopt(zmq.SNDHWM, 4 * self.config.ring_slots)
        push.setsockopt(zmq.IMMEDIATE, 1)
        try:
            pull.bind(f"tcp://{self._net_host}:*")
            push.bind(f"tcp://{self._net_host}:*")
        except zmq.ZMQError as exc:
            pull.close(linger=0)
            push.close(linger=0)
            raise ProtocolError(ErrorCode.INTERNAL, f"cannot bind network frame sockets on {self._net_host}: {exc}") from None
        session.net_input = pull.getsockopt_string(zmq.LAST_ENDPOINT)
        session.net_output = push.getsockopt_string(zmq.LAST_ENDPOINT)
        self.io.outbox.put(
            sio.NetAttach(session.session_id, pull, push, session.width, session.height, session.pixel_format)
        )
        return {"input_address": session.net_input, "output_address": session.net_output, "encoding": session.encoding}

    def _op_close_session(self, msg: Any) -> dict[str, Any]:
        session = self._session(msg.session_id)
        self._close_session(session, "closed by the client", event="session_closed")
        return {"session_id": msg.session_id, "closed": True}

    def _preset(self, name: str) -> Any:
        try:
            return self.presets.get(name)
        except KeyError as exc:
            raise ProtocolError(ErrorCode.UNKNOWN_PRESET, str(exc.args[0])) from None

    def _apply_preset(self, session: Session, name: str) -> None:
        preset = self._preset(name)
        self._change(session, preset.params(), preset=name)

    def _apply_params(self, session: Session, changes: dict[str, Any]) -> None:
        self._change(session, changes, preset=None)

    def _change(self, session: Session, changes: dict[str, Any], *, preset: str | None) -> None:
        """Validate now (a bad value is a ``bad_params`` reply); apply now when the prompt is encoded already, else
        once the prompt worker has encoded it (the stream keeps going meanwhile, with the old prompt)."""
        from ..engine import SessionParams

        try:
            SessionParams.model_validate({**session.engine_session.params.model_dump(), **changes})
        except ValueError as exc:
            what = f"preset {preset!r}" if preset else "set_params"
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"{what}: {_pydantic_message(exc)}") from None
        # Later changes of the same session wait behind earlier ones, so they apply in order.
        waiting = any(s is session for s, *_ in self._deferred)
        prompt = changes.get("prompt")
        assert self.warmer is not None
        if prompt is not None and prompt != session.engine_session.params.prompt and not self.warmer.is_ready(prompt):
            self.warmer.request(prompt)
            waiting = True
        if waiting:
            self._deferred.append((session, prompt or "", changes, preset))
            return
        self._apply_now(session, changes, preset)

    def _apply_now(self, session: Session, changes: dict[str, Any], preset: str | None) -> None:
        assert self.warmer is not None
        with self.warmer.lock:
            session.engine_session.set_params(**changes)
        if preset is not None:
            previous, session.preset = session.preset, preset
            log.info("session %s: preset %s -> %s", session.session_id, previous, preset)
            self._event("preset_changed", session.session_id, preset=preset)
        else:
            self._event("params_changed", session.session_id, preset=session.preset, params=session.params())

    def _apply_deferred(self) -> None:
        assert self.warmer is not None
        still: list[tuple[Session, str, dict[str, Any], str | None]] = []
        blocked: set[str] = set()
        for session, prompt, changes, preset in self._deferred:
            if session.session_id not in self.sessions:
                continue
            if session.session_id in blocked:
                still.append((session, prompt, changes, preset))
                continue
            if prompt and not self.warmer.is_ready(prompt):
                error = self.warmer.failed(prompt)
                if error is None:
                    still.append((session, prompt, changes, preset))
                    blocked.add(session.session_id)
                    continue
                self._event("error", session.session_id, code="bad_params", message=f"prompt could not be encoded: {error}")
                continue
            try:
                self._apply_now(session, changes, preset)
            except ValueError as exc:
                self._event("error", session.session_id, code="bad_params", message=str(exc))
            except Exception as exc:  # noqa: BLE001 - one session's failure must not take the others down
                log.exception("session %s: applying %s failed", session.session_id, changes)
                self._close_session(session, f"parameter change failed: {type(exc).__name__}: {exc}", code="internal")
        self._deferred = still

    def _op_set_preset(self, msg: Any) -> dict[str, Any]:
        session = self._session(msg.session_id)
        self._apply_preset(session, msg.name)
        pending = any(s is session for s, *_ in self._deferred)
        return {"session_id": session.session_id, "preset": msg.name, "params": {**session.params(), **self._preset(msg.name).params()}, "pending": pending}

    def _op_set_params(self, msg: Any) -> dict[str, Any]:
        session = self._session(msg.session_id)
        changes = msg.changes()
        if not changes:
            raise ProtocolError(
                ErrorCode.BAD_PARAMS, "set_params: give at least one of prompt, steps, noise_scale, seed, transition_chunks"
            )
        self._apply_params(session, changes)
        pending = any(s is session for s, *_ in self._deferred)
        return {"session_id": session.session_id, "params": {**session.params(), **changes}, "pending": pending}

    # ------------------------------------------------------------------ closing

    def _close_session(self, session: Session, reason: str, *, code: str | None = None, event: str | None = None) -> None:
        if self.sessions.pop(session.session_id, None) is None:
            return
        self.io.session_ids.discard(session.session_id)
        self.io.last_seen.pop(session.session_id, None)
        try:
            with self.output.lock:  # no output is being written while the rings go away
                self.output.forget(session.session_id)
                session.close()
        finally:
            if session.transport == "net":
                self.io.outbox.put(sio.NetDetach(session.session_id))
        level = logging.WARNING if code else logging.INFO
        log.log(level, "session %s closed: %s", session.session_id, reason)
        self._event(event or ("error" if code else "session_closed"), session.session_id, code=code, message=reason)
        if code and event is None:
            self._event("session_closed", session.session_id, code=code, message=reason)

    def _shutdown(self, reason: str, *, dead: bool) -> None:
        for session in list(self.sessions.values()):
            try:
                self._close_session(session, f"daemon stopping ({reason})", event="session_closed")
            except Exception:  # noqa: BLE001 - keep closing the others
                log.exception("closing session %s", session.session_id)
        self._publish_daemon("dead" if dead else "stopping", message=reason)
        if self.warmer is not None:
            self.warmer.close()
        self.output.stop()
        log.debug("output thread stopped")
        self.io.stop()
        log.debug("IO thread stopped (alive=%s)", self.io.is_alive())
        self.ctx.term()
        log.debug("ZeroMQ context terminated")

    # ------------------------------------------------------------------ PUB

    def _publish(self, topic: str, body: dict[str, Any]) -> None:
        self.io.outbox.put(sio.Publish(topic, body))

    def _event(self, event: str, session_id: str | None = None, **fields: Any) -> None:
        self._publish(TOPIC_EVENT, {"event": event, "session_id": session_id, **fields, "ts": time.time()})

    def _publish_daemon(self, state: str, message: str | None = None) -> None:
        self._publish(
            TOPIC_DAEMON,
            {
                "state": state,
                "protocol": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "uptime_s": round((time.monotonic_ns() - self.started_ns) / 1e9, 2),
                "sessions": len(self.sessions),
                "message": message,
                "ts": time.time(),
            },
        )


class _Interrupted(BaseException):
    """SIGTERM/SIGINT while the model loads (before the compute loop exists to receive a SHUTDOWN message)."""


def _pydantic_message(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in errors()
            )
        except Exception:  # noqa: BLE001
            pass
    return str(exc)


# ---------------------------------------------------------------------------------------------------- serve


def _setup_logging(config: DaemonConfig, *, console: Any = None) -> None:
    from rich.logging import RichHandler

    handlers: list[logging.Handler] = []
    if console is not None:
        handlers.append(RichHandler(console=console, show_path=False, rich_tracebacks=False))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(handler)
    if config.log_file is not None:
        file_handler = logging.FileHandler(config.log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file_handler)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(config.log_level)


def serve(config: DaemonConfig) -> int:
    """Run the daemon until shutdown; returns the exit code. Binds first (so a busy port fails in a second, not
    after a model load), then loads the model, then serves."""
    import faulthandler
    import sys

    from . import ui as ui_mod

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack: a stuck daemon explains itself
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    # The output thread must get the GIL back within ~1 ms of an output's due time while the compute thread runs
    # the engine's Python code between kernels (default switch interval: 5 ms, visible as output jitter).
    sys.setswitchinterval(0.001)
    use_ui = config.ui and sys.stdout.isatty()
    view = ui_mod.StatsView() if use_ui else None
    _setup_logging(config, console=view.console if view else None)
    presets = load_presets(config.preset_dirs, user=config.user_presets)
    for problem in presets.problems:
        log.warning("preset skipped: %s", problem)
    if not len(presets):
        log.warning("no presets found: sessions run with the engine's default prompt")
    stale = sweep_stale_rings()
    if stale:
        log.info("removed %d shared-memory ring(s) left by a daemon that is gone: %s", len(stale), ", ".join(stale))
    daemon = Daemon(config, engine=None, presets=presets)
    try:
        daemon.start()
    except (OSError, RuntimeError) as exc:
        log.error("%s", exc)
        daemon.io.outbox.close()
        daemon.ctx.term()
        return 2
    def _interrupt_load(signum: int, _frame: Any) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():  # a signal during the (long) load stops it at once
        signal.signal(signal.SIGTERM, _interrupt_load)
        signal.signal(signal.SIGINT, _interrupt_load)
    try:
        engine = _load_engine(config, view)
    except _Interrupted as exc:
        log.info("interrupted by %s while loading the model", exc)
        daemon._shutdown(f"signal {exc} during model load", dead=False)
        return 0
    except Exception as exc:  # noqa: BLE001 - reported as the dead sentinel, then exit
        log.error("cannot load model %r: %s", config.model, exc)
        daemon._shutdown(f"model load failed: {exc}", dead=True)
        return 1
    daemon.install_signal_handlers()  # from here on a signal is a SHUTDOWN message on the compute loop's queue
    daemon.attach_engine(engine)
    log.info("sdlive daemon ready: model %s on %s, control %s", daemon.model_name, daemon.device, daemon.io.bound_control)
    if view is not None:
        daemon.on_stats = view.update
        with view:
            return daemon.run()
    return daemon.run()


def _load_engine(config: DaemonConfig, view: Any) -> Any:
    from ..engine import StreamEngine

    dtype = None
    if config.dtype is not None:
        import torch

        dtype = getattr(torch, config.dtype)
    started = time.perf_counter()
    if view is not None:
        with view.console.status(f"loading model {config.model} …"):
            engine = StreamEngine.load(config.model, weights=config.weights, device=config.device, dtype=dtype)
    else:
        engine = StreamEngine.load(config.model, weights=config.weights, device=config.device, dtype=dtype)
    log.info("model %s loaded in %.1f s", config.model, time.perf_counter() - started)
    if config.warmup:
        _warm_up(engine)
    return engine


def _warm_up(engine: Any, size: int = 64, frames: int = 21) -> None:
    """Push a few chunks of noise through a throwaway session (first-call kernel setup, allocator growth)."""
    import numpy as np

    from ..engine import SessionParams

    started = time.perf_counter()
    try:
        session = engine.open_session(
            width=size, height=size, params=SessionParams(prompt="warm-up"), pixel_format="bgr24"
        )
        rng = np.random.default_rng(0)
        for _ in range(frames):
            session.push(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    except Exception as exc:  # noqa: BLE001 - a failed warm-up only costs the first session some time
        log.warning("warm-up failed (the first session may start slowly): %s", exc)
        return
    log.info("warm-up done in %.1f s", time.perf_counter() - started)
