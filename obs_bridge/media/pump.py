"""The capture → daemon → sink pump shared by ``sdlive cam``, ``sdlive render`` and ``sdlive demo``.

Two ways to run a source through a daemon session:

* :func:`run_live` (``cam``): frames are sent as they come (a webcam paces itself; files, folders, screens and
  generated clips are paced at the source fps) and restyled frames are written to the sinks as they come back,
  newest first: a slow daemon drops frames rather than building a queue. Keys switch presets while it runs.
* :func:`run_offline` (``render``, ``demo``): every input frame gets exactly one output frame, in order. The pump keeps
  at most ``latency_frames + chunk`` frames in flight, so nothing is lapped in the rings, and **pads** the end of
  the stream: after the last input it repeats that frame until the daemon has returned the outputs of every real
  input (those padding outputs are thrown away). The output therefore has as many frames as the input, at the
  same fps. An output that never arrives (dropped by the daemon) is filled with the previous output and counted.

Both report :class:`PumpStats` through a callback a few times a second and return the final one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .capture import CapturedFrame, FrameSource
from .sinks import FrameSink

if TYPE_CHECKING:
    from ..client import RestyledFrame, SessionClient

__all__ = ["PumpStats", "PresetSwitcher", "run_live", "run_offline", "side_by_side", "label", "PumpError"]

log = logging.getLogger("sdlive.media")

RECV_POLL_S = 0.05
STATS_PERIOD_S = 0.25
JITTER_FRAMES = 6  # live: restyled frames held at most, to smooth the daemon's bursts into a steady rate
CHUNK_FRAMES = 4  # the engine restyles 4-frame chunks: the in-flight window leaves room for one more chunk


class PumpError(RuntimeError):
    """The stream stopped: the daemon stopped answering, or a sink failed. The message says which."""


def _rate(times: deque[float]) -> float:
    if len(times) < 2 or times[-1] == times[0]:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])


@dataclass
class PumpStats:
    """What a pump has done so far. ``latency_ms`` is capture → restyled frame back in this process."""

    preset: str | None = None
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    padded: int = 0
    preset_switches: int = 0
    started: float = field(default_factory=time.perf_counter)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=512))
    _in_times: deque[float] = field(default_factory=lambda: deque(maxlen=32))
    _out_times: deque[float] = field(default_factory=lambda: deque(maxlen=32))
    all_latencies_ms: list[float] = field(default_factory=list)

    def note_in(self) -> None:
        self.frames_in += 1
        self._in_times.append(time.perf_counter())

    def note_out(self, latency_ms: float | None) -> None:
        self.frames_out += 1
        self._out_times.append(time.perf_counter())
        if latency_ms is not None and latency_ms >= 0:
            self.latencies_ms.append(latency_ms)
            self.all_latencies_ms.append(latency_ms)

    @property
    def fps_in(self) -> float:
        return _rate(self._in_times)

    @property
    def fps_out(self) -> float:
        return _rate(self._out_times)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def mean_fps_out(self) -> float:
        return self.frames_out / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_percentile(self, q: float) -> float | None:
        data = self.all_latencies_ms or list(self.latencies_ms)
        return float(np.percentile(np.asarray(data), q)) if data else None

    @property
    def latency_ms(self) -> float | None:
        """Median over the recent outputs."""
        return float(np.median(np.asarray(self.latencies_ms))) if self.latencies_ms else None

    def line(self) -> str:
        lat = f"{self.latency_ms:.0f} ms" if self.latency_ms is not None else "–"
        return (f"{self.preset or 'default'} │ in {self.fps_in:5.1f} fps │ out {self.fps_out:5.1f} fps │ "
                f"latency {lat} │ frames {self.frames_out}/{self.frames_in} │ dropped {self.dropped}")


# ------------------------------------------------------------------------------------------------------------ frames


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left | right`` (the right frame is resized to the left's height when they differ)."""
    if right.shape[:2] != left.shape[:2]:
        import cv2

        right = cv2.resize(right, (left.shape[1], left.shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(np.concatenate([left, right], axis=1))


def label(frame: np.ndarray, text: str, *, corner: str = "top-left") -> np.ndarray:
    """Draw ``text`` on a dark band in a corner of a copy of ``frame``."""
    import cv2

    out = frame.copy()
    h, w = out.shape[:2]
    scale = max(0.3, min(w, h) / 500)
    thick = max(1, int(round(scale * 2)))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(2, th // 3)
    x = pad if corner.endswith("left") else w - tw - 2 * pad
    y = pad if corner.startswith("top") else h - th - base - 2 * pad
    band = out[y : y + th + base + pad, x : x + tw + 2 * pad]
    band[:] = (band * 0.35).astype(np.uint8)
    cv2.putText(out, text, (x + pad, y + th + pad // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick,
                cv2.LINE_AA)
    return out


# ------------------------------------------------------------------------------------------------------------ presets


class PresetSwitcher:
    """Maps keys to presets: ``1``–``9`` pick the n-th preset, ``n``/``p`` (or ``+``/``-``) the next/previous one."""

    def __init__(self, names: Sequence[str], current: str | None = None) -> None:
        self.names = list(names)
        self.index = self.names.index(current) if current in self.names else -1

    @property
    def current(self) -> str | None:
        return self.names[self.index] if 0 <= self.index < len(self.names) else None

    def key(self, key: str) -> str | None:
        """The preset to switch to for ``key``, or None when the key means nothing (or there are no presets)."""
        if not self.names or not key:
            return None
        if key.isdigit() and key != "0":
            i = int(key) - 1
            if i >= len(self.names):
                return None
            self.index = i
        elif key in ("n", "+", "]", "\t"):
            self.index = (self.index + 1) % len(self.names)
        elif key in ("p", "-", "["):
            self.index = (self.index - 1) % len(self.names) if self.index >= 0 else len(self.names) - 1
        else:
            return None
        return self.names[self.index]


def _latency_ms(frame: RestyledFrame) -> float | None:
    """Capture → restyled frame back here (the frame carries its input's capture timestamp)."""
    if frame.timestamp_ns <= 0:
        return None
    return (time.monotonic_ns() - frame.timestamp_ns) / 1e6


# ------------------------------------------------------------------------------------------------------------ live


def run_live(
    source: FrameSource,
    session: SessionClient,
    sinks: Iterable[FrameSink],
    *,
    side_by_side_view: bool = False,
    max_frames: int | None = None,
    duration_s: float | None = None,
    keys: queue.SimpleQueue[str] | None = None,
    switcher: PresetSwitcher | None = None,
    on_stats: Callable[[PumpStats], None] | None = None,
    stop: threading.Event | None = None,
    stats: PumpStats | None = None,
    idle_timeout_s: float = 10.0,
    steady_output: bool = True,
) -> PumpStats:
    """Stream ``source`` through ``session`` (a :class:`~sdlive.obs_bridge.client.SessionClient`) into ``sinks``.

    Runs until the source ends (and its last outputs are back), ``max_frames`` outputs were written,
    ``duration_s`` passed, ``stop`` is set, a key ``q``/Esc arrives on ``keys`` or a sink window is closed. Keys are
    handled on this thread (control calls are not made from two threads at once).

    ``steady_output`` writes at most one frame per source period (the daemon's frames come in bursts when its engine
    step holds its loop; a virtual camera wants a steady rate): up to ``JITTER_FRAMES`` wait their turn, older ones
    are dropped (newest wins) and counted.
    """
    sinks = list(sinks)
    stop = stop or threading.Event()
    stats = stats or PumpStats(preset=switcher.current if switcher else None)
    sent_frames: OrderedDict[int, np.ndarray] = OrderedDict()  # timestamp_ns -> input pixels, for side by side
    sent_lock = threading.Lock()
    sender_done = threading.Event()
    sender_error: list[BaseException] = []

    def sender() -> None:
        period = 1.0 / source.fps if source.fps > 0 else 0.0
        t0 = time.perf_counter()
        n = 0
        try:
            while not stop.is_set():
                if not source.self_paced and period:
                    delay = t0 + n * period - time.perf_counter()
                    if delay > 0:
                        stop.wait(delay)
                    elif delay < -1.0:  # fell more than a second behind (suspend, slow disk): don't burst
                        t0, n = time.perf_counter(), 0
                frame: CapturedFrame | None = source.read()
                if frame is None:
                    break
                n += 1
                if side_by_side_view:
                    with sent_lock:
                        sent_frames[frame.timestamp_ns] = frame.pixels
                        while len(sent_frames) > 256:
                            sent_frames.popitem(last=False)
                session.send(frame.pixels, timestamp_ns=frame.timestamp_ns)
                stats.note_in()
        except BaseException as exc:  # reported on the main thread
            sender_error.append(exc)
        finally:
            sender_done.set()

    thread = threading.Thread(target=sender, name="sdlive-capture", daemon=True)
    period = 1.0 / source.fps if steady_output and source.fps > 0 else 0.0
    ready: deque[tuple[np.ndarray, float | None]] = deque()
    next_tick = 0.0
    started = time.monotonic()
    last_stats = 0.0
    last_output = time.monotonic()
    last_input: np.ndarray | None = None
    thread.start()
    try:
        while not stop.is_set():
            if sender_error:
                raise sender_error[0]
            if duration_s is not None and time.monotonic() - started >= duration_s:
                break
            # keys: from the terminal reader and from preview windows
            pending: list[str] = []
            if keys is not None:
                while True:
                    try:
                        pending.append(keys.get_nowait())
                    except queue.Empty:
                        break
            for sink in sinks:
                pending.extend(sink.poll_keys())
            for key in pending:
                if key in ("q", "\x1b", "\x03"):
                    stop.set()
                    break
                name = switcher.key(key) if switcher else None
                if name:
                    session.set_preset(name)
                    stats.preset = name
                    stats.preset_switches += 1
                    log.info("preset → %s", name)
            if stop.is_set() or any(s.closed for s in sinks):
                break

            # 1. deliver: at most one frame per output tick (a jitter buffer: the daemon's frames come in bursts
            #    when its engine step blocks, virtual cameras want a steady rate)
            now = time.monotonic()
            if ready and (period == 0.0 or now >= next_tick):
                pixels, latency = ready.popleft()
                for sink in sinks:
                    sink.write(pixels)
                stats.note_out(latency)
                next_tick = next_tick + period if now - next_tick < period else now + period
                if max_frames is not None and stats.frames_out >= max_frames:
                    break
            wait = RECV_POLL_S if not ready else max(0.0, min(RECV_POLL_S, next_tick - now))
            # 2. collect
            out = session.recv(timeout_s=wait)
            now = time.monotonic()
            if out is not None:
                last_output = now
                pixels = out.pixels
                if side_by_side_view:
                    with sent_lock:
                        inp = sent_frames.get(out.timestamp_ns)
                        if inp is not None:
                            # forget older inputs: outputs come back in order
                            while sent_frames and next(iter(sent_frames)) != out.timestamp_ns:
                                sent_frames.popitem(last=False)
                    if inp is None:
                        inp = last_input if last_input is not None else np.zeros_like(pixels)
                    last_input = inp
                    pixels = side_by_side(inp, pixels)
                ready.append((pixels, _latency_ms(out)))
                if len(ready) > JITTER_FRAMES:  # more than a burst behind: newest wins
                    ready.popleft()
                    stats.dropped += 1
            elif ready:
                pass  # delivered on the next tick
            elif sender_done.is_set():
                # the source ended: wait out the pipeline's latency, then stop
                if now - last_output > max(1.0, 3 * session.latency_frames / max(source.fps, 1.0)):
                    break
            elif now - last_output > idle_timeout_s and stats.frames_in > 0:
                raise PumpError(f"the daemon returned no frame for {idle_timeout_s:g} s (is it still running? "
                                f"see `sdlive status`)")
            if on_stats and now - last_stats >= STATS_PERIOD_S:
                last_stats = now
                on_stats(stats)
    finally:
        stop.set()
        thread.join(timeout=2.0)
        if on_stats:
            on_stats(stats)
    if sender_error:
        raise sender_error[0]
    return stats


# ------------------------------------------------------------------------------------------------------------ offline


def _input_room(session: SessionClient) -> int:
    """How many more frames the daemon's shared-memory input ring takes before an unread frame would be lapped.

    The daemon takes one input frame per engine step, so a renderer that writes faster than that must wait or frames
    are lost: ``SessionClient.pending_inputs`` (frames written, not yet taken) against the ring's slots. Network
    sessions have no such view: their room is the in-flight window alone, and a daemon that falls behind drops
    frames, which :func:`run_offline` fills and counts."""
    pending, slots = session.pending_inputs, session.input_slots
    if pending is None:
        return 1 << 30
    return (slots or 4) - 1 - pending


def run_offline(
    source: FrameSource,
    session: SessionClient,
    sinks: Iterable[FrameSink],
    *,
    side_by_side_view: bool = False,
    max_frames: int | None = None,
    schedule: dict[int, str] | None = None,
    label_presets: bool = False,
    on_stats: Callable[[PumpStats], None] | None = None,
    on_frame: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
    stats: PumpStats | None = None,
    timeout_s: float = 30.0,
) -> PumpStats:
    """Render every frame of ``source`` (at most ``max_frames``) through ``session`` into ``sinks``, in order.

    ``schedule`` maps an input frame index to a preset switched to just before that frame is sent (the demo's
    mid-stream switches). ``label_presets`` writes the active preset's name on each output. ``on_frame(i)`` is
    called after output ``i`` was written (progress bars). The output has exactly as many frames as the input:
    the tail is flushed by padding (see the module doc).
    """
    sinks = list(sinks)
    schedule = dict(schedule or {})
    stop = stop or threading.Event()
    stats = stats or PumpStats()
    latency = session.latency_frames
    window = max(1, latency + CHUNK_FRAMES)
    ts_index: dict[int, int] = {}  # timestamp_ns -> input index (padding gets indices >= total)
    inputs: dict[int, np.ndarray] = {}  # index -> input pixels (side by side), freed as outputs are written
    presets: dict[int, str | None] = {}
    total: int | None = None  # real input frames, known once the source ends
    sent = 0
    next_out = 0  # index of the next output to write
    last_pixels: np.ndarray | None = None
    last_frame: CapturedFrame | None = None
    last_ts = 0
    last_progress = time.monotonic()
    last_stats = 0.0

    def emit(index: int, pixels: np.ndarray) -> None:
        nonlocal next_out
        name = presets.get(index)
        if label_presets and name:
            pixels = label(pixels, name, corner="top-left")
        if side_by_side_view:
            pixels = side_by_side(inputs.pop(index), pixels)
        else:
            inputs.pop(index, None)
        for sink in sinks:
            sink.write(pixels)
        presets.pop(index, None)
        next_out = index + 1
        if on_frame:
            on_frame(index)

    while not stop.is_set():
        if total is not None and next_out >= total:
            break
        # 1. keep the window full: real frames first, then padding once the source is done
        blocked = False
        while sent - next_out < window and not stop.is_set():
            if _input_room(session) <= 0:
                blocked = True  # the daemon hasn't taken the last frames yet: don't lap its input ring
                break
            if total is None:
                frame = source.read() if (max_frames is None or sent < max_frames) else None
                if frame is None:
                    total = sent
                    if total == 0:
                        raise PumpError(f"{source.description} has no frames")
                    continue
                last_frame = frame
                if sent in schedule:
                    session.set_preset(schedule[sent])
                    stats.preset = schedule[sent]
                    stats.preset_switches += 1
                pixels = frame.pixels
                inputs[sent] = pixels
                presets[sent] = stats.preset
                stats.note_in()
            else:
                if sent >= total + latency + CHUNK_FRAMES * 2:
                    break  # padded enough: whatever is missing now was dropped
                assert last_frame is not None  # total > 0: a real frame was read
                pixels = last_frame.pixels  # padding: repeat the last frame to push the tail out
                stats.padded += 1
            ts = max(time.monotonic_ns(), last_ts + 1)  # unique per frame: outputs are matched by timestamp
            last_ts = ts
            ts_index[ts] = sent
            session.send(pixels, timestamp_ns=ts)
            sent += 1

        # 2. collect what came back (briefly when only the daemon's input ring was full: it empties fast)
        out = session.recv(timeout_s=0.005 if blocked else RECV_POLL_S * 4)
        now = time.monotonic()
        if out is not None:
            index = ts_index.pop(out.timestamp_ns, None)
            if index is None or index < next_out:
                continue  # a frame we no longer wait for (or a daemon that doesn't echo timestamps: see below)
            last_progress = now
            if total is not None and index >= total:
                index = total  # padding output: everything real before it is either written or lost
            while next_out < index:  # outputs the daemon dropped: hold the previous one
                if last_pixels is None:
                    last_pixels = np.zeros_like(out.pixels)
                stats.dropped += 1
                emit(next_out, last_pixels)
            if total is None or index < total:
                last_pixels = out.pixels
                emit(index, out.pixels)
                stats.note_out(_latency_ms(out))
        elif now - last_progress > timeout_s:
            raise PumpError(
                f"the daemon returned no frame for {timeout_s:g} s after {stats.frames_out} of "
                f"{total if total is not None else '?'} frames (is it still running? see `sdlive status`)"
            )
        elif total is not None and sent >= total + latency + CHUNK_FRAMES * 2 and now - last_progress > 5.0:
            while next_out < total:  # the tail never came back: hold the last output
                stats.dropped += 1
                emit(next_out, last_pixels if last_pixels is not None else np.zeros_like(inputs[next_out]))
        if on_stats and now - last_stats >= STATS_PERIOD_S:
            last_stats = now
            on_stats(stats)
    if on_stats:
        on_stats(stats)
    return stats
