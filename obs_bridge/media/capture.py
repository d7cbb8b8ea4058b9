"""Capture sources: where the frames sent to the daemon come from.

One function, :func:`open_source`, turns a source spec into a :class:`FrameSource`:

==========================  =================================================================================
spec                        source
==========================  =================================================================================
``webcam:0`` / ``0``        a webcam by index (OpenCV)
``webcam:/dev/video2``      a webcam by device path
``webcam:NAME``             a webcam by (part of) its name (Linux: ``/sys/class/video4linux/*/name``)
``PATH`` / ``file:PATH``    a video file (anything FFmpeg/OpenCV reads)
``DIR`` / ``images:DIR``    a folder of images, in name order
``screen``                  the primary monitor (``screen:2``: monitor 2; ``screen:x,y,w,h``: a region) via mss
``synthetic`` / ``:N``      generated moving shapes (endless, or N frames): works on any machine
``attach:SESSION``          mirror an existing daemon session's output (e.g. an OBS filter's)
==========================  =================================================================================

Every source yields :class:`CapturedFrame` objects whose pixels are ``H×W×3`` ``uint8`` **BGR** (OpenCV's order),
resized to ``width``/``height`` when those are given. ``read()`` returns ``None`` at the end of a finite source.
"""

from __future__ import annotations

import math
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from sdlive.daemon.protocol.constants import DEFAULT_CONTROL_ADDRESS, PIXEL_FORMATS

if TYPE_CHECKING:
    from sdlive.daemon.protocol.messages import SessionStats

__all__ = ["CapturedFrame", "FrameSource", "SourceError", "open_source", "synthetic_frame", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_FPS = 30.0
SYNTHETIC_SIZE = (256, 256)
SYNTHETIC_FPS = 15.0


class SourceError(RuntimeError):
    """A capture source cannot be opened or stopped delivering frames; the message names the fix."""


@dataclass(frozen=True)
class CapturedFrame:
    """One frame read from a capture source.

    ``index`` counts the frames this source has returned, from 0 (the n-th ``read()``: a file's frame number, a
    generated clip's frame); ``timestamp_ns`` is ``time.monotonic_ns()`` at capture, the timestamp a session
    carries through to the restyled frame. (The daemon's restyled frames count from 1 instead:
    ``RestyledFrame.seq`` in ``sdlive.obs_bridge.client``.)"""

    index: int
    timestamp_ns: int
    pixels: np.ndarray  # H×W×3 uint8, BGR


def _cv2() -> ModuleType:
    import cv2

    try:  # OpenCV prints a warning per failed backend probe; our errors say it better.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # pragma: no cover - very old OpenCV
        pass
    return cv2


def _target_size(native: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """The output size: as asked, or keeping the aspect ratio when only one side is given (rounded to even)."""
    nw, nh = native
    if width and height:
        return int(width), int(height)
    if width:
        return int(width), max(2, round(nh * width / nw / 2) * 2)
    if height:
        return max(2, round(nw * height / nh / 2) * 2), int(height)
    return nw, nh


class FrameSource(ABC):
    """A stream of BGR frames.

    ``size`` is ``(width, height)`` of the frames ``read()`` returns, ``fps`` the source's rate, ``frame_count`` the
    number of frames of a finite source (``None`` for live or endless ones). ``self_paced`` sources (webcams,
    attached sessions) block in ``read()`` until the next frame exists; the others return at once and the caller paces
    them. Use as a context manager; ``close()`` is idempotent.
    """

    kind: str = "source"
    self_paced: bool = False

    def __init__(self, *, size: tuple[int, int], fps: float, frame_count: int | None, description: str) -> None:
        if size[0] <= 0 or size[1] <= 0:
            raise SourceError(f"{description}: invalid frame size {size[0]}x{size[1]}")
        self._size = (int(size[0]), int(size[1]))
        self._fps = float(fps) if fps and fps > 0 else DEFAULT_FPS
        self._frame_count = frame_count
        self.description = description
        self._index = 0
        self._closed = False

    @property
    def size(self) -> tuple[int, int]:
        return self._size

    @property
    def width(self) -> int:
        return self._size[0]

    @property
    def height(self) -> int:
        return self._size[1]

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def frame_count(self) -> int | None:
        return self._frame_count

    @property
    def frames_read(self) -> int:
        return self._index

    def read(self) -> CapturedFrame | None:
        """The next frame, or ``None`` at the end of the source."""
        if self._closed:
            raise SourceError(f"{self.description}: read() after close()")
        pixels = self._read_pixels()
        if pixels is None:
            return None
        pixels = self._fit(pixels)
        frame = CapturedFrame(self._index, time.monotonic_ns(), pixels)
        self._index += 1
        return frame

    def _fit(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        elif pixels.shape[2] == 4:
            pixels = np.ascontiguousarray(pixels[:, :, :3])
        h, w = pixels.shape[:2]
        if (w, h) != self._size:
            cv2 = _cv2()
            shrinking = w * h > self._size[0] * self._size[1]
            pixels = cv2.resize(pixels, self._size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        return np.ascontiguousarray(pixels, dtype=np.uint8)

    @abstractmethod
    def _read_pixels(self) -> np.ndarray | None: ...

    def _release(self) -> None:  # noqa: B027 - optional hook
        """Free the device or file."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[CapturedFrame]:
        while True:
            frame = self.read()
            if frame is None:
                return
            yield frame

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description} {self.width}x{self.height}@{self.fps:g}>"


# ---------------------------------------------------------------------------------------------------------------- webcam


def _linux_webcam_by_name(name: str) -> str | None:
    root = Path("/sys/class/video4linux")
    if not root.is_dir():
        return None
    for entry in sorted(root.iterdir()):
        try:
            label = (entry / "name").read_text().strip()
        except OSError:
            continue
        if name.lower() in label.lower():
            return f"/dev/{entry.name}"
    return None


def _list_webcams() -> str:
    if sys.platform.startswith("linux"):
        devices = sorted(Path("/dev").glob("video*"))
        if not devices:
            return "no /dev/video* device exists on this machine"
        return "devices: " + ", ".join(str(d) for d in devices)
    return "check the camera is connected and allowed in the OS privacy settings"


class WebcamSource(FrameSource):
    kind = "webcam"
    self_paced = True

    def __init__(self, device: str, *, width: int | None = None, height: int | None = None,
                 fps: float | None = None) -> None:
        cv2 = _cv2()
        target: int | str
        if device.isdigit():
            target = int(device)
            label = f"webcam {device}"
        elif device.startswith("/dev/") or device.startswith("\\\\"):
            target = device
            label = f"webcam {device}"
        else:
            found = _linux_webcam_by_name(device) if sys.platform.startswith("linux") else None
            if found is None:
                where = "its index (webcam:0) or device path" if sys.platform.startswith("linux") else "its index: webcam:0"
                raise SourceError(f"no webcam named {device!r} found; open it by {where} ({_list_webcams()})")
            target, label = found, f"webcam {device!r} ({found})"
        cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"cannot open {label}: no camera answered ({_list_webcams()}). Plug a webcam in, close other apps "
                f"using it, or pick another input: --input webcam:1, a video file, screen, or synthetic"
            )
        if width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, int(width))
        if height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, int(height))
        if fps:
            cap.set(cv2.CAP_PROP_FPS, float(fps))
        ok, first = cap.read()
        if not ok or first is None:
            cap.release()
            raise SourceError(f"{label} opened but delivers no frames (is another app using it?)")
        self._cap = cap
        self._pending: np.ndarray | None = first
        native = (first.shape[1], first.shape[0])
        cam_fps = fps or cap.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
        super().__init__(size=_target_size(native, width, height), fps=cam_fps, frame_count=None, description=label)

    def _read_pixels(self) -> np.ndarray | None:
        if self._pending is not None:
            pixels, self._pending = self._pending, None
            return pixels
        ok, pixels = self._cap.read()
        if not ok or pixels is None:
            raise SourceError(f"{self.description} stopped delivering frames (unplugged?)")
        return pixels

    def _release(self) -> None:
        self._cap.release()


# ------------------------------------------------------------------------------------------------------------ video file


class VideoFileSource(FrameSource):
    kind = "file"

    def __init__(self, path: str | os.PathLike, *, width: int | None = None, height: int | None = None,
                 fps: float | None = None, loop: bool = False) -> None:
        cv2 = _cv2()
        p = Path(path)
        if not p.exists():
            raise SourceError(f"video file not found: {p} (check the path)")
        if not p.is_file():
            raise SourceError(f"not a file: {p}")
        if not os.access(p, os.R_OK):
            raise SourceError(f"cannot read {p}: permission denied")
        cap = cv2.VideoCapture(str(p))
        ok, first = cap.read() if cap.isOpened() else (False, None)
        if not ok or first is None:
            cap.release()
            raise SourceError(
                f"cannot decode video file {p}: not a video OpenCV/FFmpeg can read (corrupt, or an unsupported "
                f"format: convert it with `ffmpeg -i {p.name} out.mp4`)"
            )
        self.path = p
        self._cap = cap
        self._pending: np.ndarray | None = first
        self._loop = loop
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        native_fps = cap.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
        self.native_fps = native_fps
        native = (first.shape[1], first.shape[0])
        super().__init__(
            size=_target_size(native, width, height),
            fps=fps or native_fps,
            frame_count=None if loop else (count if count > 0 else None),
            description=f"file {p.name}",
        )

    def _read_pixels(self) -> np.ndarray | None:
        if self._pending is not None:
            pixels, self._pending = self._pending, None
            return pixels
        ok, pixels = self._cap.read()
        if (not ok or pixels is None) and self._loop and self._index > 0:
            self._cap.set(_cv2().CAP_PROP_POS_FRAMES, 0)
            ok, pixels = self._cap.read()
        return pixels if ok else None

    def _release(self) -> None:
        self._cap.release()


# ---------------------------------------------------------------------------------------------------------- image folder


class ImageFolderSource(FrameSource):
    kind = "images"

    def __init__(self, folder: str | os.PathLike, *, width: int | None = None, height: int | None = None,
                 fps: float | None = None, loop: bool = False) -> None:
        d = Path(folder)
        if not d.is_dir():
            raise SourceError(f"image folder not found: {d}")
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not files:
            raise SourceError(f"no images in {d} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self._files = files
        self._loop = loop
        self._next = 0
        first = self._load(files[0])
        super().__init__(
            size=_target_size((first.shape[1], first.shape[0]), width, height),
            fps=fps or DEFAULT_FPS,
            frame_count=None if loop else len(files),
            description=f"images {d}",
        )

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        cv2 = _cv2()
        pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if pixels is None:
            raise SourceError(f"cannot read image {path} (corrupt or unsupported format)")
        return pixels

    def _read_pixels(self) -> np.ndarray | None:
        if self._next >= len(self._files):
            if not self._loop:
                return None
            self._next = 0
        path = self._files[self._next]
        self._next += 1
        return self._load(path)


# ---------------------------------------------------------------------------------------------------------------- screen


class ScreenSource(FrameSource):
    """A monitor or a region of the screen, grabbed with ``mss`` (X11 on Linux, GDI on Windows, Quartz on macOS)."""

    kind = "screen"

    def __init__(self, region: str, *, width: int | None = None, height: int | None = None,
                 fps: float | None = None) -> None:
        try:
            import mss
        except ImportError as exc:  # pragma: no cover - mss is a dependency
            raise SourceError("screen capture needs the `mss` package: pip install mss") from exc
        region_box = None
        if region and not region.isdigit():
            try:
                x, y, w, h = (int(v) for v in region.split(","))
            except ValueError:
                raise SourceError(f"bad screen region {region!r}: expected screen:x,y,w,h (e.g. screen:0,0,1280,720)") from None
            if w <= 0 or h <= 0:
                raise SourceError(f"bad screen region {region!r}: width and height must be positive")
            region_box = {"left": x, "top": y, "width": w, "height": h}
        try:
            self._mss = mss.MSS() if hasattr(mss, "MSS") else mss.mss()
        except Exception as exc:  # mss raises ScreenShotError without a display
            hint = " (no X display: set DISPLAY, e.g. run inside your desktop session)" if sys.platform.startswith("linux") else ""
            raise SourceError(f"cannot open the screen for capture: {exc}{hint}") from exc
        monitors = self._mss.monitors  # [0] = all monitors together, [1..] = each
        if region_box is not None:
            box = region_box
        elif not region:
            box = dict(monitors[1] if len(monitors) > 1 else monitors[0])
        else:
            n = int(region)
            if not 0 <= n < len(monitors):
                self._mss.close()
                raise SourceError(f"no monitor {n}: this screen has monitors 1..{len(monitors) - 1} (0 = all)")
            box = dict(monitors[n])
        self._box = {k: int(box[k]) for k in ("left", "top", "width", "height")}
        super().__init__(
            size=_target_size((self._box["width"], self._box["height"]), width, height),
            fps=fps or DEFAULT_FPS,
            frame_count=None,
            description=f"screen {self._box['width']}x{self._box['height']}+{self._box['left']}+{self._box['top']}",
        )

    def _read_pixels(self) -> np.ndarray | None:
        try:
            shot = self._mss.grab(self._box)
        except Exception as exc:
            raise SourceError(f"screen capture failed: {exc} (is the region inside the screen?)") from exc
        return np.asarray(shot)[:, :, :3]  # BGRA → BGR

    def _release(self) -> None:
        self._mss.close()


# ------------------------------------------------------------------------------------------------------------- synthetic


def synthetic_frame(index: int, width: int, height: int) -> np.ndarray:
    """Frame ``index`` of a deterministic moving-shapes clip (BGR): a slowly shifting gradient, a ball, a square
    and a triangle moving on smooth paths, and a caption. Drawn with OpenCV, needs no file."""
    cv2 = _cv2()
    t = index / SYNTHETIC_FPS
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = 0.6 * t
    b = 120 + 80 * np.sin(xs / width * math.pi + phase)
    g = 90 + 60 * np.sin(ys / height * math.pi * 1.5 - phase)
    r = 140 + 70 * np.cos((xs + ys) / (width + height) * math.pi * 2 + phase * 0.7)
    img = np.ascontiguousarray(np.stack([b, g, r], axis=2).clip(0, 255).astype(np.uint8))
    s = min(width, height)
    # ground line
    cv2.rectangle(img, (0, int(height * 0.8)), (width, height), (40, 90, 60), -1)
    # a bouncing ball
    cx = int(width * (0.5 + 0.35 * math.sin(1.3 * t)))
    cy = int(height * 0.8 - abs(math.sin(2.1 * t)) * height * 0.5) - s // 10
    cv2.circle(img, (cx, cy), max(2, s // 10), (30, 60, 230), -1, cv2.LINE_AA)
    cv2.circle(img, (cx - s // 30, cy - s // 30), max(1, s // 40), (200, 220, 255), -1, cv2.LINE_AA)
    # a rotating square
    box = cv2.boxPoints(((width * (0.3 + 0.1 * math.cos(0.7 * t)), height * 0.35), (s * 0.22, s * 0.22), 40 * t))
    cv2.fillPoly(img, [box.astype(np.int32)], (220, 180, 40), cv2.LINE_AA)
    # a drifting triangle
    tx = int(width * (0.75 + 0.15 * math.sin(0.9 * t + 1)))
    ty = int(height * (0.3 + 0.1 * math.cos(1.1 * t)))
    d = s // 8
    tri = np.array([[tx, ty - d], [tx - d, ty + d], [tx + d, ty + d]], np.int32)
    cv2.fillPoly(img, [tri], (60, 200, 250), cv2.LINE_AA)
    scale = max(0.3, s / 400)
    cv2.putText(img, "sdlive", (s // 20, int(height * 0.93)), cv2.FONT_HERSHEY_SIMPLEX, scale, (250, 250, 250),
                max(1, int(scale * 2)), cv2.LINE_AA)
    return img


class SyntheticSource(FrameSource):
    kind = "synthetic"

    def __init__(self, frames: int | None = None, *, width: int | None = None, height: int | None = None,
                 fps: float | None = None) -> None:
        if frames is not None and frames <= 0:
            raise SourceError(f"synthetic:{frames}: the frame count must be positive")
        self._draw_size = _target_size(SYNTHETIC_SIZE, width, height)
        super().__init__(size=self._draw_size, fps=fps or SYNTHETIC_FPS, frame_count=frames,
                         description="synthetic moving shapes")

    def _read_pixels(self) -> np.ndarray | None:
        if self._frame_count is not None and self._index >= self._frame_count:
            return None
        return synthetic_frame(self._index, *self._draw_size)


# --------------------------------------------------------------------------------------------------------------- attach


class AttachedSessionSource(FrameSource):
    """The restyled output of an existing daemon session (an OBS filter's, another cam's), read from its output ring
    with ``read_latest`` (newest wins), without consuming it for its owner.

    A quiet session (its OBS source hidden, a slow daemon) is waited for: every ``check_s`` without a frame the
    daemon is asked whether the session still exists. The stream ends (``read()`` returns None) when the session is
    closed; a daemon that stops answering is a :class:`SourceError`."""

    kind = "attach"
    self_paced = True

    def __init__(self, session_id: str, *, daemon: str | None = None, token: str | None = None,
                 width: int | None = None, height: int | None = None, fps: float | None = None,
                 timeout_s: float = 20.0, check_s: float = 5.0) -> None:
        from sdlive.daemon.protocol.ring import FrameRing, RingError

        self._address = daemon or DEFAULT_CONTROL_ADDRESS
        self._token, self._timeout_s, self._check_s = token, timeout_s, check_s
        self.session_id = session_id
        sessions = self._sessions(lost="")
        info = next((s for s in sessions if s.session_id == session_id), None)
        if info is None:
            known = ", ".join(s.session_id for s in sessions) or "none"
            raise SourceError(f"no session {session_id!r} on the daemon at {self._address} (open sessions: {known}; "
                              f"see `sdlive status`)")
        if not info.output_ring:
            raise SourceError(
                f"session {session_id} on {self._address} has no shared-memory output ring to attach to "
                f"(network sessions can't be mirrored; attach on the daemon's machine)"
            )
        try:
            # observer: read without moving the owner's consumer counters (the OBS filter keeps its frames)
            self._ring = FrameRing.open(info.output_ring, observer=True)
        except (OSError, RingError) as exc:
            raise SourceError(f"cannot open session {session_id}'s output ring {info.output_ring}: {exc}") from exc
        self._pixel_format = self._ring.pixel_format
        self._native = (self._ring.width, self._ring.height)
        super().__init__(size=_target_size(self._native, width, height), fps=fps or info.fps or DEFAULT_FPS,
                         frame_count=None, description=f"session {session_id}")

    def _sessions(self, *, lost: str) -> list[SessionStats]:
        """The daemon's open sessions; a daemon that does not answer is a SourceError (``lost``: what was going on)."""
        from ..client import DaemonClient, DaemonUnavailable

        try:
            with DaemonClient(self._address, token=self._token, timeout_s=self._timeout_s) as dc:
                return dc.status().sessions
        except DaemonUnavailable as exc:
            raise SourceError(f"{lost}{exc}") from None

    def _read_pixels(self) -> np.ndarray | None:
        next_check = time.monotonic() + self._check_s
        while True:
            if self._ring.closed_flag:
                return None  # the session ended
            rf = self._ring.read_latest()
            if rf is not None:
                return _to_bgr(np.frombuffer(rf.data, np.uint8), self._native, self._pixel_format)
            if time.monotonic() >= next_check:
                lost = f"lost the daemon while mirroring session {self.session_id}: "
                if all(s.session_id != self.session_id for s in self._sessions(lost=lost)):
                    return None
                next_check = time.monotonic() + self._check_s
            self._ring.wait(0.05, poll_s=0.001)

    def _release(self) -> None:
        self._ring.close()


def _to_bgr(flat: np.ndarray, size: tuple[int, int], pixel_format: str) -> np.ndarray:
    """A packed frame in any protocol pixel format as H×W×3 BGR."""
    w, h = size
    info = PIXEL_FORMATS[pixel_format]
    r, g, b = info.rgb_index
    img = flat[: w * h * info.bytes_per_pixel].reshape(h, w, info.bytes_per_pixel)
    return np.ascontiguousarray(img[:, :, [b, g, r]])


# ----------------------------------------------------------------------------------------------------------------- spec


def open_source(spec: str, *, width: int | None = None, height: int | None = None, fps: float | None = None,
                loop: bool = False, daemon: str | None = None, token: str | None = None) -> FrameSource:
    """Open the capture source that ``spec`` names (see the module doc for the forms).

    ``width``/``height`` resize frames (one side alone keeps the aspect ratio); ``fps`` overrides the rate (asked of
    a webcam, used to pace files and generated sources). ``loop`` restarts files and image folders at their end.
    ``daemon``/``token`` are used by ``attach:SESSION``. Raises :class:`SourceError` naming the problem and the fix.
    """
    spec = spec.strip()
    if not spec:
        raise SourceError("empty input spec: use webcam:0, a video file, an image folder, screen, or synthetic")
    kind, sep, arg = spec.partition(":")
    kind_l = kind.lower()
    # Windows drive letters ("C:\\clip.mp4") are paths, not kinds.
    if sep and len(kind) == 1 and kind.isalpha() and sys.platform == "win32":
        kind_l, arg = "", spec
    if kind_l in ("webcam", "cam", "camera"):
        return WebcamSource(arg or "0", width=width, height=height, fps=fps)
    if spec.isdigit():
        return WebcamSource(spec, width=width, height=height, fps=fps)
    if kind_l == "screen":
        return ScreenSource(arg, width=width, height=height, fps=fps)
    if kind_l in ("synthetic", "test", "shapes"):
        try:
            frames = int(arg) if arg else None
        except ValueError:
            raise SourceError(f"bad synthetic spec {spec!r}: expected synthetic or synthetic:FRAMES") from None
        return SyntheticSource(frames, width=width, height=height, fps=fps)
    if kind_l == "attach":
        if not arg:
            raise SourceError("attach needs a session id: attach:SESSION (see `sdlive status`)")
        return AttachedSessionSource(arg, daemon=daemon, token=token, width=width, height=height, fps=fps)
    if kind_l in ("images", "folder", "dir"):
        return ImageFolderSource(arg, width=width, height=height, fps=fps, loop=loop)
    path = arg if kind_l == "file" else spec
    if Path(path).is_dir():
        return ImageFolderSource(path, width=width, height=height, fps=fps, loop=loop)
    if not Path(path).exists() and sep and kind_l not in ("file",) and not Path(spec).exists():
        raise SourceError(
            f"unknown input {spec!r}: use webcam:N, screen[:x,y,w,h], synthetic[:N], attach:SESSION, images:DIR "
            f"or a video file path"
        )
    return VideoFileSource(path, width=width, height=height, fps=fps, loop=loop)
