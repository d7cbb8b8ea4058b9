"""Sinks: where restyled frames go.

:func:`open_sink` turns an output spec into a :class:`FrameSink`:

=====================  ===================================================================================
spec                   sink
=====================  ===================================================================================
``vcam``               the virtual webcam (pyvirtualcam; every backend this OS has is tried in turn)
``vcam:BACKEND``       one backend by name (``v4l2loopback``, ``obs``, ``unitycapture`` or a registered one)
``window``             a preview window (OpenCV's if it has a GUI, otherwise Tk)
``file:PATH`` / PATH   a video file (PyAV/FFmpeg: H.264 for .mp4/.mkv/.mov, VP9 for .webm, MPEG-4 for .avi)
``none``               nothing: frames are counted for the stats only
=====================  ===================================================================================

Every sink takes ``H×W×3`` ``uint8`` **BGR** frames of the size it was opened with.
"""

from __future__ import annotations

import os
import platform
import queue
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ..frames import check_frame

if TYPE_CHECKING:
    import tkinter

    from av.audio.stream import AudioStream
    from av.container import InputContainer, OutputContainer
    from av.packet import Packet

__all__ = [
    "FrameSink",
    "SinkError",
    "VirtualCameraUnavailable",
    "VirtualCameraSink",
    "VideoFileSink",
    "WindowSink",
    "NullSink",
    "open_sink",
    "virtual_camera_fix",
    "VIDEO_EXTENSIONS",
]

VIDEO_EXTENSIONS = {".mp4": "libx264", ".m4v": "libx264", ".mov": "libx264", ".mkv": "libx264",
                    ".webm": "libvpx-vp9", ".avi": "mpeg4"}


_SinkT = TypeVar("_SinkT", bound="FrameSink")


class SinkError(RuntimeError):
    """A sink cannot be opened or written; the message names the problem and the fix."""


class VirtualCameraUnavailable(SinkError):
    """No virtual-camera backend could be opened on this machine."""


def virtual_camera_fix(system: str | None = None) -> str:
    """What to do, on this OS, to get a virtual-camera device pyvirtualcam can open."""
    system = system or platform.system()
    if system == "Linux":
        return ("install v4l2loopback (Debian/Ubuntu: sudo apt install v4l2loopback-dkms) and load it: "
                "sudo modprobe v4l2loopback devices=1 exclusive_caps=1")
    if system == "Windows":
        return ("install OBS Studio (28 or newer) and start its virtual camera once (Start Virtual Camera, then "
                "Stop, and leave it stopped while sdlive uses it), or install Unity Capture")
    if system == "Darwin":
        return ("install OBS Studio (30 or newer), start its virtual camera once and allow the OBS camera "
                "extension in System Settings → Privacy & Security")
    return f"no virtual-camera backend is known for {system}; use --output window or --output file:PATH"


class FrameSink(ABC):
    """Takes BGR frames of a fixed ``(width, height)``. Context manager; ``close()`` is idempotent."""

    kind = "sink"

    def __init__(self, *, width: int, height: int, fps: float) -> None:
        if width <= 0 or height <= 0:
            raise SinkError(f"invalid sink size {width}x{height}")
        self.width = int(width)
        self.height = int(height)
        self.fps = float(fps)
        self._frames_sent = 0
        self._times: deque[float] = deque(maxlen=64)
        self._closed = False

    @property
    def frames_sent(self) -> int:
        return self._frames_sent

    @property
    def current_fps(self) -> float:
        """Rate of ``write()`` calls over the last frames (0 until two frames were written)."""
        if len(self._times) < 2 or self._times[-1] == self._times[0]:
            return 0.0
        return (len(self._times) - 1) / (self._times[-1] - self._times[0])

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, frame: np.ndarray, timestamp_ns: int | None = None) -> None:
        """Show/write one frame. ``timestamp_ns`` is its capture time (``time.monotonic_ns()`` clock): a timed
        file sink places the frame by it; the other sinks show frames as they come."""
        if self._closed:
            raise SinkError(f"{self.kind} sink: write() after close()")
        self._write(check_frame(frame, (self.height, self.width, 3)), timestamp_ns)
        self._frames_sent += 1
        self._times.append(time.perf_counter())

    @abstractmethod
    def _write(self, frame: np.ndarray, timestamp_ns: int | None) -> None: ...

    def _release(self) -> None:  # noqa: B027 - optional hook
        """Free the device or finish the file."""

    def poll_keys(self) -> list[str]:
        """Keys pressed in the sink's own window since the last call (only the preview window has any)."""
        return []

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self: _SinkT) -> _SinkT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -------------------------------------------------------------------------------------------------------- virtual camera


class VirtualCameraSink(FrameSink):
    """The virtual webcam Zoom/Discord/Meet see, through pyvirtualcam (BGR in, the backend converts)."""

    kind = "vcam"

    def __init__(self, *, width: int, height: int, fps: float, backend: str | None = None,
                 device: str | None = None) -> None:
        super().__init__(width=width, height=height, fps=fps)
        import pyvirtualcam
        from pyvirtualcam.camera import BACKENDS

        if backend is not None and backend not in BACKENDS:
            known = ", ".join(BACKENDS) or "none"
            raise VirtualCameraUnavailable(
                f"unknown virtual-camera backend {backend!r} (this machine has: {known}); "
                f"omit it to try every backend. To get one: {virtual_camera_fix()}"
            )
        if not BACKENDS:
            raise VirtualCameraUnavailable(f"no virtual-camera backend exists for {platform.system()}. {virtual_camera_fix()}")
        try:
            self._cam = pyvirtualcam.Camera(self.width, self.height, self.fps, fmt=pyvirtualcam.PixelFormat.BGR,
                                            backend=backend, device=device)
        except Exception as exc:  # pyvirtualcam reports every backend's failure, one per line
            reasons = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise VirtualCameraUnavailable(
                f"no virtual camera could be opened ({reasons}). Fix: {virtual_camera_fix()}. "
                f"Or use --output window / --output file:PATH"
            ) from exc

    @property
    def backend(self) -> str:
        return self._cam.backend

    @property
    def device(self) -> str:
        return self._cam.device

    def _write(self, frame: np.ndarray, timestamp_ns: int | None) -> None:
        self._cam.send(frame)

    def _release(self) -> None:
        self._cam.close()


# ------------------------------------------------------------------------------------------------------------ video file


class VideoFileSink(FrameSink):
    """A video file written with PyAV (FFmpeg's libraries ship inside its wheel, nothing else to install).

    ``audio_from`` copies the first audio stream of that file into the output (re-encoded only when the container
    can't hold its codec), interleaved with the video and cut at the video's end.

    ``timed`` (a live recording, ``sdlive cam --output file:…``): each frame is placed at its capture timestamp
    (frames a live stream dropped leave the previous frame on screen for longer; two frames in one frame slot keep
    the first), so the file plays at real speed. Untimed (``render``): frame n is at n / fps.
    """

    kind = "file"

    def __init__(self, path: str | os.PathLike, *, width: int, height: int, fps: float,
                 audio_from: str | os.PathLike | None = None, codec: str | None = None, crf: int = 18,
                 timed: bool = False) -> None:
        super().__init__(width=width, height=height, fps=fps)
        import av

        self.timed = timed
        self._t0_ns: int | None = None
        self._next_pts = 0  # the first free frame slot

        self.path = Path(path)
        ext = self.path.suffix.lower()
        if codec is None:
            if ext not in VIDEO_EXTENSIONS:
                raise SinkError(f"cannot write {self.path.name}: unknown video extension {ext or '(none)'!r} "
                                f"(use one of {', '.join(VIDEO_EXTENSIONS)})")
            codec = VIDEO_EXTENSIONS[ext]
        if self.path.parent and not self.path.parent.exists():
            raise SinkError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        self._rate = Fraction(self.fps).limit_denominator(1001)
        try:
            self._container = av.open(str(self.path), "w")
        except Exception as exc:
            raise SinkError(f"cannot create {self.path}: {exc}") from exc
        self._enc_w, self._enc_h = self.width + self.width % 2, self.height + self.height % 2  # yuv420p: even sizes
        stream = self._container.add_stream(codec, rate=self._rate)
        if not isinstance(stream, av.VideoStream):
            self._container.close()
            raise SinkError(f"cannot write {self.path.name}: {codec} is not a video codec")
        stream.width, stream.height, stream.pix_fmt = self._enc_w, self._enc_h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        elif codec.startswith("libvpx"):
            stream.options = {"crf": str(crf + 14), "b:v": "0", "deadline": "realtime", "cpu-used": "8"}
        elif codec == "mpeg4":  # no CRF: give it a bitrate high enough for near-lossless small frames
            stream.bit_rate = max(2_000_000, int(self._enc_w * self._enc_h * self.fps * 0.5))
        self._video = stream
        self._audio = _AudioCopy.open(Path(audio_from), self._container, ext) if audio_from is not None else None
        self.has_audio = self._audio is not None

    def _mux_audio_until(self, seconds: float | None) -> None:
        """Write the input's audio up to ``seconds`` of output time (None: up to the video's end)."""
        if self._audio is not None:
            end = self._next_pts / float(self._rate)  # written so far
            self._audio.mux_until(end if seconds is None else seconds)

    def _slot(self, timestamp_ns: int | None) -> int | None:
        """The frame slot (pts) of the next frame; None when a timed frame falls in a slot already written."""
        if not self.timed or timestamp_ns is None:
            return self._next_pts
        if self._t0_ns is None:
            self._t0_ns = timestamp_ns
        pts = round((timestamp_ns - self._t0_ns) / 1e9 * float(self._rate))
        return pts if pts >= self._next_pts else None

    def _write(self, frame: np.ndarray, timestamp_ns: int | None) -> None:
        import av

        pts = self._slot(timestamp_ns)
        if pts is None:
            return
        if (self._enc_w, self._enc_h) != (self.width, self.height):
            frame = np.pad(frame, ((0, self._enc_h - self.height), (0, self._enc_w - self.width), (0, 0)), mode="edge")
        vf = av.VideoFrame.from_ndarray(frame, format="bgr24")
        vf.pts = pts
        vf.time_base = 1 / self._rate
        for pkt in self._video.encode(vf):
            self._container.mux(pkt)
        self._next_pts = pts + 1
        self._mux_audio_until(self._next_pts / float(self._rate))  # interleave as we go

    def _release(self) -> None:
        try:
            for pkt in self._video.encode():
                self._container.mux(pkt)
            if self._audio is not None:
                self._mux_audio_until(None)
                self._audio.flush()
        finally:
            self._container.close()
            if self._audio is not None:
                self._audio.close()


class _AudioCopy:
    """The first audio stream of an input file, copied into an output container (re-encoded only when the output's
    container can't hold its codec) as the video is written."""

    # the audio codecs each container takes as they are (None: any)
    COPYABLE: dict[str, set[str] | None] = {
        ".mp4": {"aac", "mp3", "ac3", "eac3", "alac", "opus"}, ".m4v": {"aac", "mp3", "ac3", "alac"},
        ".mov": {"aac", "mp3", "ac3", "alac", "pcm_s16le", "pcm_s24le"}, ".mkv": None,
        ".webm": {"opus", "vorbis"}, ".avi": {"mp3", "ac3", "pcm_s16le"},
    }

    def __init__(self, source: InputContainer, stream_in: AudioStream, output: OutputContainer,
                 stream_out: AudioStream, *, transcode: bool) -> None:
        self._source, self._in, self._output, self._out = source, stream_in, output, stream_out
        self._transcode = transcode
        self._packets: Iterator[Packet] | None = source.demux(stream_in)
        self._pending: Packet | None = None

    @classmethod
    def open(cls, src: Path, output: OutputContainer, ext: str) -> _AudioCopy | None:
        """The copier for ``src``'s audio, or None when it has none (or is no media file PyAV reads)."""
        import av

        try:
            inp = av.open(str(src))
        except Exception:
            return None  # not a media file PyAV reads: no audio to keep
        if not inp.streams.audio:
            inp.close()
            return None
        a_in = inp.streams.audio[0]
        allowed = cls.COPYABLE.get(ext, set())
        if allowed is None or a_in.codec_context.name in allowed:
            return cls(inp, a_in, output, output.add_stream_from_template(a_in), transcode=False)
        target = "libopus" if ext == ".webm" else "aac"
        rate = 48000 if target == "libopus" else (a_in.codec_context.sample_rate or 48000)  # opus: 48 kHz only
        a_out = output.add_stream(target, rate=rate)
        if not isinstance(a_out, av.AudioStream):
            inp.close()
            return None
        a_out.layout = "stereo" if a_in.codec_context.channels >= 2 else "mono"
        return cls(inp, a_in, output, a_out, transcode=True)

    def mux_until(self, limit_s: float) -> None:
        """Write the audio that starts before ``limit_s`` of output time."""
        from av import AudioFrame

        tb = self._in.time_base
        while self._packets is not None:
            pkt = self._pending
            if pkt is None:
                pkt = next(self._packets, None)
                if pkt is None:
                    self._packets = None
                    return
                if pkt.dts is None:  # the demuxer's flush packet
                    continue
            stamp = pkt.pts if pkt.pts is not None else pkt.dts
            if tb is not None and stamp is not None and float(stamp * tb) >= limit_s:
                self._pending = pkt
                return
            self._pending = None
            if self._transcode:
                for frame in pkt.decode():
                    if not isinstance(frame, AudioFrame):
                        continue
                    frame.pts = None
                    for out in self._out.encode(frame):
                        self._output.mux(out)
            else:
                pkt.stream = self._out
                self._output.mux(pkt)

    def flush(self) -> None:
        """The encoder's last packets (transcoding only)."""
        if self._transcode:
            for pkt in self._out.encode():
                self._output.mux(pkt)

    def close(self) -> None:
        self._source.close()


# -------------------------------------------------------------------------------------------------------------- window


class WindowSink(FrameSink):
    """A preview window: OpenCV's highgui when this OpenCV build has one, otherwise Tk. Keys pressed in it are
    returned by :meth:`poll_keys`; closing it (or Esc/q) sets ``closed``."""

    kind = "window"

    def __init__(self, *, width: int, height: int, fps: float, title: str = "sdlive") -> None:
        super().__init__(width=width, height=height, fps=fps)
        self.title = title
        self._keys: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._backend: str | None = None
        self._photo: tkinter.PhotoImage | None = None
        reasons = []
        try:
            import cv2

            cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)
            self._backend = "opencv"
            self._cv2 = cv2
        except Exception as exc:
            gui = "this OpenCV build has no GUI (opencv-python-headless)" if "not implemented" in str(exc) else str(exc)
            reasons.append(f"OpenCV: {gui.strip()[:160]}")
        if self._backend is None:
            try:
                import tkinter as tk

                self._root = tk.Tk()
                self._root.title(title)
                self._label = tk.Label(self._root)
                self._label.pack()
                self._root.bind("<Key>", lambda e: self._keys.put(e.char or e.keysym))
                self._root.protocol("WM_DELETE_WINDOW", self._on_close)
                self._backend = "tk"
            except Exception as exc:
                reasons.append(f"Tk: {exc}")
        if self._backend is None:
            self._closed = True
            raise SinkError(
                "cannot open a preview window (" + "; ".join(reasons) + "). Run it inside a desktop session "
                "(DISPLAY set on Linux), or use --output vcam / --output file:PATH / --output none"
            )

    def _on_close(self) -> None:
        self.close()

    def _write(self, frame: np.ndarray, timestamp_ns: int | None) -> None:
        if self._backend == "opencv":
            self._cv2.imshow(self.title, frame)
            key = self._cv2.waitKey(1)
            if key not in (-1, 255):
                self._keys.put(chr(key & 0xFF))
            return
        import tkinter as tk

        rgb = frame[:, :, ::-1]
        header = f"P6 {self.width} {self.height} 255 ".encode()
        data = header + rgb.tobytes()
        if self._photo is None:
            self._photo = photo = tk.PhotoImage(data=data, format="PPM")
            self._label.configure(image=photo)
        else:
            self._photo.configure(data=data, format="PPM")
        self._root.update()

    def poll_keys(self) -> list[str]:
        keys = []
        while True:
            try:
                keys.append(self._keys.get_nowait())
            except queue.Empty:
                return keys

    def _release(self) -> None:
        if self._backend == "opencv":
            try:
                self._cv2.destroyWindow(self.title)
                self._cv2.waitKey(1)
            except Exception:
                pass
        elif self._backend == "tk":
            try:
                self._root.destroy()
            except Exception:
                pass


class NullSink(FrameSink):
    """Drops frames; the pump still counts them for its stats line."""

    kind = "none"

    def _write(self, frame: np.ndarray, timestamp_ns: int | None) -> None:
        pass


def open_sink(spec: str, *, width: int, height: int, fps: float, audio_from: str | os.PathLike | None = None,
              vcam_device: str | None = None, timed: bool = False) -> FrameSink:
    """Open the sink ``spec`` names (see the module doc); ``timed`` files place frames by their capture timestamps
    (live recordings). Raises :class:`SinkError` naming the problem and the fix."""
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    kind_l = kind.lower()
    if kind_l in ("vcam", "virtualcam", "camera"):
        return VirtualCameraSink(width=width, height=height, fps=fps, backend=arg or None, device=vcam_device)
    if kind_l in ("window", "preview"):
        return WindowSink(width=width, height=height, fps=fps)
    if kind_l in ("none", "null", "stats"):
        return NullSink(width=width, height=height, fps=fps)
    if kind_l == "file":
        if not arg:
            raise SinkError("file output needs a path: --output file:out.mp4")
        return VideoFileSink(arg, width=width, height=height, fps=fps, audio_from=audio_from, timed=timed)
    if Path(spec).suffix.lower() in VIDEO_EXTENSIONS:
        return VideoFileSink(spec, width=width, height=height, fps=fps, audio_from=audio_from, timed=timed)
    raise SinkError(f"unknown output {spec!r}: use vcam[:BACKEND], window, file:PATH (or a .mp4/.mkv/.webm path) or none")
