"""The op handlers: each takes a decoded, authorised request and returns its reply model (or raises ProtocolError).

Two desks, split by who may answer:

* :class:`FrontDesk` runs on the IO thread and answers at once, however busy the model is: ``hello``,
  ``list_presets``, ``heartbeat``, ``shutdown``, and ``set_preset`` / ``set_params``, which it validates against the
  session's planned parameters (``directory.py``), queues for the compute loop as a :class:`~.items.ParamsChange`
  and acknowledges with ``pending: true``.
* :class:`LoopOps` runs on the compute loop, for what needs the engine or the sessions' live figures:
  ``open_session``, ``close_session``, ``status``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from ..engine.interface import InsufficientMemory
from ..presets import Preset, PresetLibrary
from ..protocol.constants import STYLE_FIELDS
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.messages import (
    CacheInfo,
    Capabilities,
    CloseSessionReply,
    CloseSessionRequest,
    HeartbeatReply,
    HelloReply,
    ListPresetsReply,
    OpenSessionReply,
    OpenSessionRequest,
    PresetInfo,
    Request,
    SessionStats,
    SetParamsReply,
    SetPresetReply,
    ShutdownReply,
    StatusReply,
    StatusRequest,
    summarize_validation_error,
)
from ..protocol.params import GenerationParams
from .directory import SessionDirectory
from .items import InboundItem, LoopRequestMessage, LoraChoice, ParamsChange, Shutdown
from .session import Session, new_session_id
from .stats import device_memory_mb
from .transports import FrameTransport, NetTransport, ShmTransport, check_frame_memory, open_transport

if TYPE_CHECKING:
    from ..model.configs import CachePolicy
    from .loop import ComputeLoop

log = logging.getLogger(__name__)

try:
    from importlib.metadata import version as _pkg_version

    DAEMON_VERSION = _pkg_version("sdlive")
except Exception:  # noqa: BLE001 - running from a source tree
    DAEMON_VERSION = "0.0.0+local"

NET_BIND_TIMEOUT_S = 5.0
"""The compute loop waits this long for the IO thread to bind a network session's sockets."""


def lookup_preset(presets: PresetLibrary, name: str) -> Preset:
    try:
        return presets.get(name)
    except KeyError as exc:
        raise ProtocolError(ErrorCode.UNKNOWN_PRESET, str(exc.args[0])) from None


def unknown_session(session_id: str, open_ids: list[str]) -> ProtocolError:
    known = ", ".join(open_ids) or "none open"
    return ProtocolError(
        ErrorCode.UNKNOWN_SESSION,
        f"no session {session_id!r} (open sessions: {known}); it may have timed out: open a new one",
    )


def preset_infos(presets: PresetLibrary) -> ListPresetsReply:
    """The ``list_presets`` reply: every preset with its index in the sorted names and where it comes from."""
    shipped = str(presets.dirs[0]) if presets.dirs else None
    infos = []
    for index, name in enumerate(presets.names()):
        p = presets.presets[name]
        source = "shipped" if shipped and p.source and p.source.startswith(shipped) else p.source
        infos.append(PresetInfo(**p.model_dump(exclude={"source"}), index=index, source=source))
    return ListPresetsReply(presets=infos, problems=[str(problem) for problem in presets.problems])


class FrontDesk:
    """The ops the IO thread answers itself. ``submit`` puts an item on the compute loop's inbox."""

    def __init__(
        self,
        *,
        hello: HelloReply,
        presets: PresetLibrary,
        directory: SessionDirectory,
        submit: Callable[[InboundItem], None],
    ) -> None:
        self.hello = hello
        self.presets = presets
        self._presets_reply = preset_infos(presets)
        self._presets_version = presets.version
        self.directory = directory
        self.submit = submit

    def answer(self, message: Request) -> BaseModel | None:
        """The reply to ``message``, or None when the compute loop must answer it."""
        if message.op == "hello":
            return self.hello
        if message.op == "list_presets":
            return self.presets_reply()
        if message.op == "heartbeat":
            if message.session_id is not None and message.session_id not in self.directory:
                raise unknown_session(message.session_id, self.directory.ids())
            return HeartbeatReply(session_id=message.session_id)
        if message.op == "shutdown":
            self.submit(Shutdown("shutdown requested"))
            return ShutdownReply()
        if message.op == "set_preset":
            self.presets.refresh()  # a preset file added or edited a moment ago is found
            preset = lookup_preset(self.presets, message.name)
            lora = LoraChoice(preset.lora_path(), preset.lora_strength)
            params = self._queue(message.session_id, preset.style(), preset=message.name, what=f"preset {message.name!r}",
                                 lora=lora)  # fmt: skip
            return SetPresetReply(session_id=message.session_id, preset=message.name, params=params)
        if message.op == "set_params":
            changes = message.changes()
            if not changes:
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"set_params: give at least one of {', '.join(STYLE_FIELDS)}")
            params = self._queue(message.session_id, changes, preset=None, what="set_params")
            return SetParamsReply(session_id=message.session_id, params=params)
        return None

    def presets_reply(self) -> ListPresetsReply:
        """The ``list_presets`` reply, rebuilt when the preset files changed (``PresetLibrary.refresh``)."""
        self.presets.refresh()
        if self.presets.version != self._presets_version:
            self._presets_version = self.presets.version
            self._presets_reply = preset_infos(self.presets)
        return self._presets_reply

    def _queue(
        self, session_id: str, changes: dict[str, object], *, preset: str | None, what: str, lora: LoraChoice | None = None
    ) -> GenerationParams:
        try:
            params = self.directory.plan(session_id, changes, preset)
        except KeyError:
            raise unknown_session(session_id, self.directory.ids()) from None
        except ValidationError as exc:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"{what}: {summarize_validation_error(exc)}") from None
        self.submit(ParamsChange(session_id, dict(changes), preset, lora))
        return params


class LoopOps:
    """The ops the compute loop answers: they need the engine, or the sessions' live figures."""

    def __init__(self, loop: ComputeLoop) -> None:
        self.loop = loop

    def answer(self, message: LoopRequestMessage) -> BaseModel:
        if isinstance(message, OpenSessionRequest):
            return self.open_session(message)
        if isinstance(message, CloseSessionRequest):
            return self.close_session(message)
        return self.status(message)

    def session(self, session_id: str) -> Session:
        session = self.loop.sessions.get(session_id)
        if session is None:
            raise unknown_session(session_id, list(self.loop.sessions))
        return session

    # ------------------------------------------------------------------ open

    def open_session(self, msg: OpenSessionRequest) -> OpenSessionReply:
        loop, config = self.loop, self.loop.config
        if len(loop.sessions) >= config.max_sessions:
            raise ProtocolError(
                ErrorCode.CAPACITY,
                f"the daemon already serves {len(loop.sessions)} sessions (max_sessions={config.max_sessions}): "
                "close one, or start the daemon with a higher --max-sessions",
            )
        frame_memory = check_frame_memory(  # before any work: a session memory cannot hold is refused at once
            msg, slots=config.ring_slots, held=[s.frame_memory for s in loop.sessions.values()],
            limit_mb=config.frame_memory_mb,
        )  # fmt: skip
        loop.presets.refresh()
        names = loop.presets.names()
        preset_name = msg.preset or config.default_preset or _first_usable_preset(loop.presets, names, loop.engine)
        values: dict[str, object] = {}
        preset = lookup_preset(loop.presets, preset_name) if preset_name is not None else None
        if preset is not None:
            values.update(preset.style())
        if msg.params is not None:
            values.update(msg.params.changes())
        try:
            params = GenerationParams.model_validate(values)
        except ValidationError as exc:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"open_session: {summarize_validation_error(exc)}") from None
        try:
            with loop.warmer.lock:  # the session encodes its prompt: no concurrent text-encoder use
                engine_session = loop.engine.open_session(
                    width=msg.width, height=msg.height, params=params, pixel_format=msg.pixel_format
                )
                set_preset = getattr(engine_session, "set_preset", None)  # a relay's remote applies presets itself
                set_lora = getattr(engine_session, "set_lora", None)  # engines with LoRA styles (StreamSession)
                if preset is not None and set_preset is not None:
                    set_preset(preset.name, values)
                elif preset is not None and preset.lora is not None and set_lora is not None:
                    set_lora(preset.lora_path(), preset.lora_strength)
        except InsufficientMemory as exc:
            raise ProtocolError(ErrorCode.CAPACITY, f"open_session: {exc}") from None
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"open_session: {exc}") from None
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
                raise ProtocolError(ErrorCode.CAPACITY, f"not enough device memory for another session: {exc}") from None
            raise
        session_id = new_session_id()
        transport = self._transport(session_id, msg)
        session = Session(
            session_id,
            width=msg.width,
            height=msg.height,
            fps=float(msg.fps),
            pixel_format=msg.pixel_format,
            client=msg.client,
            engine_session=engine_session,
            transport=transport,
            preset=preset_name,
            pacing=msg.pacing,
            frame_memory=frame_memory,
        )
        loop.sessions[session_id] = session
        loop.directory.add(session_id, session.params, preset_name)
        log.info(
            "session %s opened: %dx%d %s @ %g fps, %s, preset %s, client %s",
            session_id, msg.width, msg.height, msg.pixel_format, msg.fps, msg.transport, preset_name, msg.client,
        )  # fmt: skip
        loop.event("session_opened", session_id, preset=preset_name)
        return OpenSessionReply(
            **session.info().model_dump(),
            slots=config.ring_slots if isinstance(transport, ShmTransport) else None,
            net=transport.endpoints if isinstance(transport, NetTransport) else None,
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_liveness=config.heartbeat_liveness,
        )

    def _transport(self, session_id: str, msg: OpenSessionRequest) -> FrameTransport:
        return open_transport(session_id, msg, slots=self.loop.config.ring_slots, outbox_put=self.loop.outbox.put,
                              bind_timeout_s=NET_BIND_TIMEOUT_S)  # fmt: skip

    # ------------------------------------------------------------------ close, status

    def close_session(self, msg: CloseSessionRequest) -> CloseSessionReply:
        self.loop.close_session(self.session(msg.session_id), "closed by the client", event="session_closed")
        return CloseSessionReply(session_id=msg.session_id)

    def status(self, msg: StatusRequest) -> StatusReply:
        loop = self.loop
        now = time.monotonic_ns()
        sessions = [self.session(msg.session_id)] if msg.session_id is not None else list(loop.sessions.values())
        memory = device_memory_mb(loop.device)
        return self.status_reply(loop.session_stats(sessions, now, memory), memory)

    def status_reply(self, stats: list[SessionStats], memory: dict[str, float | None]) -> StatusReply:
        loop = self.loop
        return StatusReply(
            daemon_version=DAEMON_VERSION,
            model=loop.model_name,
            device=loop.device,
            uptime_s=round((time.monotonic_ns() - loop.started_ns) / 1e9, 2),
            max_sessions=loop.config.max_sessions,
            control_address=loop.io.bound_control,
            pub_address=loop.io.bound_pub,
            presets=len(loop.presets),
            cache=loop.cache,
            compat=loop.compat,
            memory=memory,
            parallel=loop.parallel_now(),
            acceleration=loop.acceleration,
            requests=loop.io.request_counters(),
            sessions=stats,
        )


def cache_info(policy: CachePolicy | None) -> CacheInfo | None:
    """The engine's KV cache settings as ``hello`` and ``status`` show them."""
    if policy is None:
        return None
    return CacheInfo(
        num_kv_cache=policy.num_kv_cache,
        num_sink=policy.num_sink,
        sink_threshold=policy.sink_threshold,
        rope_refresh_frames=policy.rope_refresh_frames,
    )


def hello_reply(*, config_token: bool, model: str, device: str, max_sessions: int, heartbeat_interval_s: float,
                heartbeat_liveness: int, pub_address: str, cache: CacheInfo | None = None,
                compat: str | None = None, security: str = "none", parallel: str | None = None,
                acceleration: str | None = None) -> HelloReply:  # fmt: skip
    """The ``hello`` reply, which does not change while the daemon runs."""
    return HelloReply(
        daemon_version=DAEMON_VERSION,
        model=model,
        device=device,
        capabilities=Capabilities(max_sessions=max_sessions),
        cache=cache,
        compat=compat,
        auth_required=config_token,
        curve=security == "curve",
        security=security,
        heartbeat_interval_s=heartbeat_interval_s,
        heartbeat_liveness=heartbeat_liveness,
        pub_address=pub_address,
        pid=os.getpid(),
        parallel=parallel,
        acceleration=acceleration,
    )


def _first_usable_preset(presets: PresetLibrary, names: list[str], engine: object) -> str | None:
    """The preset a session gets when neither the client nor the config names one: the first by name whose prompt
    the model takes (a model with a fixed vocabulary, ``mini``, takes only its own style prompts; the rest take any)."""
    vocabulary = getattr(engine, "prompt_vocabulary", None)
    if vocabulary is not None:
        from ..model.mini import normalise_prompt

        known = {normalise_prompt(p) for p in vocabulary}
        for name in names:
            preset = presets.presets.get(name)
            if preset is not None and normalise_prompt(preset.prompt) in known:
                return name
    return names[0] if names else None
