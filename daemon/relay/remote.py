"""An engine whose model runs in another machine's sdlive daemon: the relay's side of a dual-PC setup.

:class:`RemoteEngine` implements :class:`~sdlive.daemon.engine.interface.Engine`; each :class:`RemoteSession` is a
network session on the remote daemon (JPEG both ways, authenticated with the remote's token), opened with the local
session's size, pixel format and parameters. The relay's daemon server runs these exactly as it runs a local
model's sessions, so the OBS filter, the CLI and every other client see an ordinary local daemon: shared memory,
presets, hotkeys, stats, pacing.

``push`` never waits for the network: it hands the frame over (a full send queue drops it, newest wins) and returns
the restyled frames that have arrived, matched to their inputs by the timestamp the relay sent them with. When the
remote daemon goes silent the session keeps running and returns nothing (the filter passes its source through);
when the remote session is gone (the daemon restarted) a background thread reopens it with the current parameters,
backing off from ``RECONNECT_INTERVAL_INIT_S`` to ``RECONNECT_INTERVAL_MAX_S``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from sdlive.obs_bridge.client import DaemonClient, DaemonError, DaemonUnavailable, SessionClient, SessionLost

from ..engine.interface import OutputFrame, Pixels, StageTimes
from ..model.configs import CachePolicy
from ..protocol.constants import (
    PIXEL_FORMATS,
    RECONNECT_INTERVAL_INIT_S,
    RECONNECT_INTERVAL_MAX_S,
    SIZE_MULTIPLE,
    STYLE_FIELDS,
)
from ..protocol.messages import HelloReply, PresetInfo
from ..protocol.params import GenerationParams

log = logging.getLogger(__name__)

DEFAULT_JPEG_QUALITY = 85
"""JPEG quality of the frames both ways: about 1/10 of the raw bytes at 720p, no visible loss on a restyle."""

REMOTE_FPS = 60.0
"""The frame rate the relay declares to the remote daemon: at least any source's real rate, so the remote never
counts the relay's frames as arriving too fast; the relay paces the outputs for its own clients."""

_MAX_IN_FLIGHT = 256
"""Input frames remembered while their outputs travel (more than any pipeline holds; the oldest are forgotten)."""


class RemoteEngine:
    """The model of the sdlive daemon at ``address`` (``tcp://gpu-box:5557``), as an :class:`Engine`.

    Raises :class:`~sdlive.obs_bridge.client.DaemonError` (e.g. ``DaemonUnavailable``) when that daemon does not
    answer ``hello`` within ``timeout_s``; a daemon still loading its model is waited for (``load_timeout_s``).
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        jpeg_quality: int = DEFAULT_JPEG_QUALITY,
        timeout_s: float = 5.0,
        load_timeout_s: float = 900.0,
        client_name: str = "sdlive-relay",
    ) -> None:
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
        self.address = address
        self.token = token
        self.jpeg_quality = jpeg_quality
        self.timeout_s = timeout_s
        self.client_name = client_name
        with DaemonClient(address, token=token, timeout_s=timeout_s) as client:
            self.hello: HelloReply = self._wait_ready(client, load_timeout_s)
            self.remote_presets: list[PresetInfo] = client.list_presets().presets

    def _wait_ready(self, client: DaemonClient, load_timeout_s: float) -> HelloReply:
        """``hello`` once the remote daemon's model is loaded (a big model takes minutes: say what it is doing)."""
        deadline = time.monotonic() + load_timeout_s
        last_stage = None
        while True:
            hello = client.hello(client=self.client_name)
            loading = getattr(hello, "loading", None)
            if getattr(hello, "state", "ready") != "loading":
                return hello
            stage = getattr(loading, "stage", None)
            if stage != last_stage:
                log.info("relay: the remote daemon at %s is loading its model: %s", self.address, stage)
                last_stage = stage
            if time.monotonic() > deadline:
                raise DaemonUnavailable(
                    f"the daemon at {self.address} is still loading its model after {load_timeout_s:.0f} s ({stage})"
                )
            time.sleep(0.5)

    @property
    def model_name(self) -> str:
        return self.hello.model

    @property
    def device(self) -> str:
        return f"{self.hello.device} at {self.address}"

    @property
    def compat(self) -> str:
        return self.hello.compat or "upstream"

    @property
    def cache_policy(self) -> CachePolicy | None:
        cache = self.hello.cache
        if cache is None:
            return None
        return CachePolicy(
            num_kv_cache=cache.num_kv_cache,
            num_sink=cache.num_sink,
            sink_threshold=cache.sink_threshold,
            rope_refresh_frames=cache.rope_refresh_frames,
        )

    def open_session(
        self, *, width: int, height: int, params: GenerationParams | None = None, pixel_format: str = "rgb24"
    ) -> RemoteSession:
        return RemoteSession(self, width=width, height=height, params=params or GenerationParams(),
                             pixel_format=pixel_format)  # fmt: skip

    def encode_prompt(self, prompt: str) -> None:
        """Nothing to do here: the remote daemon encodes (and caches) a prompt when a session first uses it."""


class RemoteSession:
    """One local session's stream through a network session on the remote daemon (an :class:`EngineSession`)."""

    def __init__(
        self, engine: RemoteEngine, *, width: int, height: int, params: GenerationParams, pixel_format: str
    ) -> None:
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
                raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE} (got {value!r})")
        if pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"unknown pixel format {pixel_format!r}: expected one of {', '.join(PIXEL_FORMATS)}")
        self.engine = engine
        self.width, self.height, self.pixel_format = width, height, pixel_format
        self._shape = (height, width, PIXEL_FORMATS[pixel_format].bytes_per_pixel)
        self._params = params
        self._preset: str | None = None
        """The remote preset this session runs (``set_preset``): reopening asks for it again, LoRA included."""
        self._lock = threading.Lock()  # the remote session and its control client: one thread at a time
        self._client: DaemonClient | None = None
        self._remote: SessionClient | None = None
        self._reopening: threading.Thread | None = None
        self._backoff_s = RECONNECT_INTERVAL_INIT_S
        self._in_flight: OrderedDict[int, int] = OrderedDict()  # timestamp sent → input index
        self._last_ts = 0
        self._frames_in = 0
        self._frames_out = 0
        self.frames_lost = 0
        """Input frames that never reached the remote daemon (it was gone, or its send queue was full)."""
        self._closed = False
        with self._lock:
            self._open()  # the first open fails loudly: open_session then reports why

    # ------------------------------------------------------------------ EngineSession

    @property
    def params(self) -> GenerationParams:
        return self._params

    @property
    def latency_frames(self) -> int:
        remote = self._remote
        return remote.latency_frames if remote is not None else 0

    @property
    def frames_in(self) -> int:
        return self._frames_in

    @property
    def frames_out(self) -> int:
        return self._frames_out

    @property
    def stage_ms(self) -> StageTimes:
        remote = self._remote
        stats = remote.daemon_stats if remote is not None else None
        stages = stats.stage_ms if stats is not None else {}
        return StageTimes(**{k: float(v) for k, v in stages.items() if k in ("encode", "dit", "decode")})

    @property
    def connected(self) -> bool:
        """True while a remote session carries the frames."""
        return self._remote is not None

    def push(self, frame: Pixels) -> list[OutputFrame]:
        """Send one frame to the remote daemon (never blocks); the restyled frames that have come back."""
        if not isinstance(frame, np.ndarray) or frame.shape != self._shape or frame.dtype != np.uint8:
            shape = getattr(frame, "shape", None)
            raise ValueError(f"frame must be uint8 {self._shape} ({self.pixel_format}), got {shape}")
        index = self._frames_in
        self._frames_in += 1
        ts = max(time.monotonic_ns(), self._last_ts + 1)
        self._last_ts = ts
        remote = self._usable()
        if remote is None:
            self.frames_lost += 1
            return []
        try:
            remote.send(frame, timestamp_ns=ts)
        except DaemonUnavailable:
            self.frames_lost += 1  # silent for now; it may come back with the session
            return []
        except SessionLost as exc:
            self._lost(str(exc))
            self.frames_lost += 1
            return []
        self._in_flight[ts] = index
        while len(self._in_flight) > _MAX_IN_FLIGHT:
            self._in_flight.popitem(last=False)
        return self._collect(0.0)

    def flush(self, timeout_s: float = 5.0) -> list[OutputFrame]:
        """End of stream: wait (up to ``timeout_s``) for the outputs of the frames in flight."""
        out: list[OutputFrame] = []
        deadline = time.monotonic() + timeout_s
        while self._in_flight and self._remote is not None and time.monotonic() < deadline:
            out += self._collect(0.05)
        return out

    def set_params(self, **changes: Any) -> None:
        """Validate here (``ValueError``, nothing changed), then hand the change to the remote session; while it
        reconnects, the reopened session starts with the new parameters."""
        new = GenerationParams.model_validate({**self._params.model_dump(), **changes})
        self._params = new
        remote = self._usable()
        if remote is None:
            return
        if not self._lock.acquire(blocking=False):
            return  # a reopen is running: it takes self._params
        try:
            remote.set_params(**changes)
        except SessionLost as exc:
            self._lost(str(exc), locked=True)
        except DaemonError as exc:
            log.warning("relay: the remote daemon did not take %s: %s", sorted(changes), exc)
        finally:
            self._lock.release()

    def set_preset(self, name: str, changes: dict[str, Any]) -> None:
        """Switch to preset ``name`` *on the remote daemon* (the relay's presets mirror the remote's), so the remote
        applies it as its own: its LoRA file, which lives on the GPU box, included. ``changes`` are the style fields
        the relay's mirror of the preset gave, with any of the client's own over them, sent after the switch
        (``ValueError`` here when they do not validate; nothing changed)."""
        new = GenerationParams.model_validate({**self._params.model_dump(), **changes})
        self._params, self._preset = new, name
        remote = self._usable()
        if remote is None:
            return  # reconnecting: the reopened session asks for the preset
        if not self._lock.acquire(blocking=False):
            return  # a reopen is running: it takes self._preset
        try:
            remote.set_preset(name)
            if changes:  # the client's own values over the preset's (the remote applies both in this order)
                remote.set_params(**{k: v for k, v in changes.items() if k in STYLE_FIELDS})
        except SessionLost as exc:
            self._lost(str(exc), locked=True)
        except DaemonError as exc:
            log.warning("relay: the remote daemon did not take preset %r: %s", name, exc)
        finally:
            self._lock.release()

    def close(self) -> None:
        """Close the remote session in the background (returns at once; the remote daemon also closes it when its
        heartbeats stop)."""
        self._closed = True

        def close_remote() -> None:
            with self._lock:
                self._close_remote()

        threading.Thread(target=close_remote, name="relay-close", daemon=True).start()

    # ------------------------------------------------------------------ the remote session

    def _open(self) -> None:
        """Open the remote session (hold the lock)."""
        engine = self.engine
        client = DaemonClient(engine.address, token=engine.token, timeout_s=engine.timeout_s)
        try:
            remote = client.open_session(
                width=self.width, height=self.height, fps=REMOTE_FPS, pixel_format=self.pixel_format,
                preset=self._preset, params=self._params.model_dump(), transport="net", client=engine.client_name,
                jpeg_quality=engine.jpeg_quality,
            )  # fmt: skip
        except BaseException:
            client.close()
            raise
        self._client, self._remote = client, remote
        self._in_flight.clear()
        self._backoff_s = RECONNECT_INTERVAL_INIT_S
        log.info("relay: remote session %s at %s (%dx%d)", remote.session_id, engine.address, self.width, self.height)

    def _close_remote(self) -> None:
        remote, client = self._remote, self._client
        self._remote = self._client = None
        if remote is not None:
            try:
                remote.close()
            except DaemonError as exc:
                log.debug("relay: closing the remote session: %s", exc)
        if client is not None:
            client.close()

    def _usable(self) -> SessionClient | None:
        remote = self._remote
        if remote is None and not self._closed and (self._reopening is None or not self._reopening.is_alive()):
            self._reopening = threading.Thread(target=self._reopen, name="relay-reopen", daemon=True)
            self._reopening.start()
        return remote

    def _lost(self, reason: str, *, locked: bool = False) -> None:
        log.warning("relay: the remote session is gone (%s); reopening it", reason)
        if locked:
            self._close_remote()
        else:
            with self._lock:
                self._close_remote()

    def _reopen(self) -> None:
        """Background: reopen the remote session until it works or the local session closes."""
        while not self._closed:
            time.sleep(self._backoff_s)
            with self._lock:
                if self._closed or self._remote is not None:
                    return
                try:
                    self._open()
                    return
                except DaemonError as exc:
                    self._backoff_s = min(RECONNECT_INTERVAL_MAX_S, self._backoff_s * 2)
                    log.info("relay: remote daemon %s not back yet (%s); retrying in %.2f s", self.engine.address,
                             exc, self._backoff_s)  # fmt: skip

    def _collect(self, timeout_s: float) -> list[OutputFrame]:
        remote = self._remote
        out: list[OutputFrame] = []
        if remote is None:
            return out
        try:
            got = remote.recv(timeout_s=timeout_s)
            while got is not None:
                index = self._in_flight.pop(got.timestamp_ns, None)
                if index is not None:
                    out.append(OutputFrame(index, got.pixels))
                got = remote.recv(timeout_s=0.0)
        except DaemonUnavailable:
            pass
        except SessionLost as exc:
            self._lost(str(exc))
        out.sort(key=lambda f: f.index)
        self._frames_out += len(out)
        return out
