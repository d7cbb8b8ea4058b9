"""A pyvirtualcam-sized API for scripts: frames you capture go through the daemon and out of the virtual webcam.

    import cv2
    from sdlive.obs_bridge import StyledCamera

    cap = cv2.VideoCapture(0)
    with StyledCamera(width=640, height=480, fps=30, preset="anime") as cam:
        print(f"virtual camera: {cam.device}")
        while True:
            ok, frame = cap.read()          # BGR, 480x640x3 uint8
            cam.send(frame)
            cam.sleep_until_next_frame()

``send`` hands the frame to the daemon and passes the newest restyled frame that has come back (if any) to the
virtual camera, so the camera runs at the rate you send at, ``latency_frames`` behind. ``sdlive cam`` is the same
loop with capture, pacing, keys and a stats line around it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from sdlive.daemon.protocol.messages import SetParamsReply, SetPresetReply

from ..client import DaemonClient, RestyledFrame
from .sinks import FrameSink, open_sink

__all__ = ["StyledCamera"]

log = logging.getLogger("sdlive.vcam")


class StyledCamera:
    """A restyling virtual webcam.

    :param width: frame width in pixels (the frames you ``send`` and the camera's).
    :param height: frame height in pixels.
    :param fps: the rate you intend to send at (the daemon paces its output at it; the camera advertises it).
    :param preset: the preset to start with (``None``: the daemon's default).
    :param daemon: the daemon's control address (``None``: the one every sdlive command uses: ``SDLIVE_CONTROL``,
        then ``control`` in the config file, then ``tcp://127.0.0.1:5557``).
    :param token: its auth token, for a remote daemon (``None``: ``SDLIVE_TOKEN``, then the config file's).
    :param output: where restyled frames go: ``"vcam"`` (every backend of this OS is tried), ``"vcam:BACKEND"``,
        ``"window"``, ``"file:PATH"`` or ``"none"``.
    :param device: the virtual camera device (e.g. ``/dev/video10``), for ``vcam`` outputs.
    :param steps: denoising steps within the protocol's ``STEPS_MIN``–``STEPS_MAX`` (``None``: the preset's).
    """

    def __init__(self, *, width: int, height: int, fps: float, preset: str | None = None,
                 daemon: str | None = None, token: str | None = None, output: str = "vcam",
                 device: str | None = None, steps: int | None = None) -> None:
        from ..cli.connect import resolve_target  # the one address rule of every sdlive command

        target = resolve_target(daemon, token, what="daemon=")
        daemon, token = target.control, target.token
        self._closed = True
        self._shape = (int(height), int(width), 3)
        self._fps = float(fps)
        self._sink: FrameSink = open_sink(output, width=width, height=height, fps=fps, vcam_device=device)
        try:
            self._client = DaemonClient(daemon, token=token, timeout_s=20.0)
            self._session = self._client.open_session(
                width=width, height=height, fps=fps, pixel_format="bgr24", preset=preset,
                params={"steps": steps} if steps else None, client="sdlive-vcam")
        except BaseException:
            self._sink.close()
            if hasattr(self, "_client"):
                self._client.close()
            raise
        self._closed = False
        self._frames_sent = 0
        self._last_frame_t: float | None = None
        log.info("styled camera %dx%d@%g: session %s → %s", width, height, fps, self._session.session_id, output)

    # ------------------------------------------------------------------ pyvirtualcam-style surface

    @property
    def width(self) -> int:
        return self._shape[1]

    @property
    def height(self) -> int:
        return self._shape[0]

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def device(self) -> str:
        """The virtual camera device in use (or the sink's kind for non-camera outputs)."""
        return getattr(self._sink, "device", self._sink.kind)

    @property
    def backend(self) -> str:
        return getattr(self._sink, "backend", self._sink.kind)

    @property
    def session_id(self) -> str:
        return self._session.session_id

    @property
    def latency_frames(self) -> int:
        return self._session.latency_frames

    @property
    def preset(self) -> str | None:
        return self._session.preset

    @property
    def frames_sent(self) -> int:
        """Frames handed to the daemon."""
        return self._frames_sent

    @property
    def frames_received(self) -> int:
        """Restyled frames passed on to the camera."""
        return self._sink.frames_sent

    @property
    def current_fps(self) -> float:
        """The camera's rate over its last frames."""
        return self._sink.current_fps

    def send(self, frame: np.ndarray) -> None:
        """Send one BGR ``height×width×3`` uint8 frame (checked by the session); passes the newest restyled frame
        on to the camera."""
        if self._closed:
            raise RuntimeError("send() on a closed StyledCamera")
        self._session.send(frame)
        self._frames_sent += 1
        self._last_frame_t = time.perf_counter()
        newest: RestyledFrame | None = None
        while True:  # newest wins: a camera shows the present
            got = self._session.recv(timeout_s=0)
            if got is None:
                break
            newest = got
        if newest is not None:
            self._sink.write(newest.pixels)

    def sleep_until_next_frame(self) -> None:
        """Sleep until one frame period after the last ``send`` (as pyvirtualcam's camera does)."""
        if self._last_frame_t is None:
            return
        delay = self._last_frame_t + 1.0 / self._fps - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    def set_preset(self, name: str) -> SetPresetReply:
        """Switch the style live (blended over the preset's transition, no restart); queued, live once the
        daemon's ``status`` shows it."""
        return self._session.set_preset(name)

    def set_params(self, **changes: Any) -> SetParamsReply:
        """Change prompt / steps / noise_scale / seed / transition_chunks live (queued like :meth:`set_preset`)."""
        return self._session.set_params(**changes)

    def close(self) -> None:
        """Close the session and the camera. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._session.close()
        finally:
            self._client.close()
            self._sink.close()

    def __enter__(self) -> StyledCamera:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"session {self._session.session_id}"
        return f"StyledCamera({self.width}x{self.height}@{self._fps:g}, {state}, backend={self.backend!r})"
