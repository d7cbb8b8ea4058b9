"""The capture → daemon → sink pump shared by ``sdlive cam``, ``sdlive render`` and ``sdlive demo``.

Two ways to run a source through a daemon session:

* :func:`run_live` (``cam``): frames are sent as they come (a webcam paces itself; files, folders, screens and
  generated clips are paced at the source fps) and restyled frames are written to the sinks as they come back,
  newest first: a slow daemon drops frames rather than building a queue. Keys switch presets while it runs.
* :func:`run_offline` (``render``, ``demo``): every input frame gets exactly one output frame, in order. The pump keeps
  at most ``latency_frames + chunk`` frames in flight, so nothing is lapped in the rings, and **pads** the end of
  the stream: after the last input it repeats that frame until the daemon has returned the outputs of every real
  input (those padding outputs are thrown away). The output therefore has as many frames as the input, at the
  same fps. An output that never arrives (dropped by the daemon) is filled with the previous output (a missing first
  one with the next) and counted.

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
    from sdlive.daemon.protocol.messages import SessionStats

    from ..client import RestyledFrame, SessionClient

__all__ = ["PumpStats", "PresetSwitcher", "preset_numbers", "run_live", "run_offline", "side_by_side", "label", "PumpError", "fit"]

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
    daemon: SessionStats | None = field(default=None, repr=False)
    """The daemon's own figures for the session (PUB stats, or a final ``status``): its drop counts."""
    last_output: np.ndarray | None = field(default=None, repr=False)
    """The last frame written to the sinks (held there while ``cam`` reconnects)."""
    reconnects: int = 0
    held: int = 0
    """Frames of ``last_output`` repeated on the sinks while reconnecting."""
    lost: str | None = None
    """Why the daemon went away (``sdlive cam`` reconnects), or None."""

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

    finished: float | None = None
    """When the pump returned (``elapsed_s`` stops there: closing the session is not streaming time)."""

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

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

    def drops(self) -> str:
        """``dropped 3 here, daemon 12 in / 52 out``: this process's drops and the daemon's own counts."""
        text = f"dropped {self.dropped} here"
        if self.daemon is not None:
            text += f", daemon {self.daemon.dropped_in} in / {self.daemon.dropped_out} out"
        return text

    def line(self) -> str:
        lat = f"{self.latency_ms:.0f} ms" if self.latency_ms is not None else "–"
        return (f"{self.preset or 'default'} │ in {self.fps_in:5.1f} fps │ out {self.fps_out:5.1f} fps │ "
                f"latency {lat} │ frames {self.frames_out}/{self.frames_in} │ {self.drops()}")


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


def preset_numbers(presets: Iterable[tuple[str, str | None]]) -> dict[str, int]:
    """One numbering of the presets for every place that shows or takes a number (``sdlive preset``, ``cam``'s keys):
    a preset whose ``hotkey`` ends in a digit (``ctrl+shift+3``, its OBS default binding) has that number; the
    others take the free numbers after them, in name order. ``presets`` are ``(name, hotkey)`` pairs."""
    pairs = sorted(presets)
    numbers: dict[str, int] = {}
    taken: set[int] = set()
    for name, hotkey in pairs:
        digit = hotkey.strip()[-1:] if hotkey else ""
        if digit.isdigit() and digit != "0" and int(digit) not in taken:
            numbers[name] = int(digit)
            taken.add(int(digit))
    n = 1
    for name, _ in pairs:
        if name in numbers:
            continue
        while n in taken:
            n += 1
        numbers[name] = n
        taken.add(n)
    return numbers


class PresetSwitcher:
    """Maps keys to presets: ``1``–``9`` pick the preset of that number (:func:`preset_numbers`; by default the
    n-th name), ``n``/``p`` (or ``+``/``-``) the next/previous one in number order."""

    def __init__(self, names: Sequence[str], current: str | None = None,
                 numbers: dict[str, int] | None = None) -> None:
        numbers = numbers or {name: i + 1 for i, name in enumerate(names)}
        self.numbers = {name: numbers.get(name, 1000 + i) for i, name in enumerate(names)}
        self.names = sorted(names, key=lambda name: self.numbers[name])
        self.index = self.names.index(current) if current in self.names else -1

    @property
    def current(self) -> str | None:
        return self.names[self.index] if 0 <= self.index < len(self.names) else None

    def follow(self, name: str | None) -> None:
        """The preset changed elsewhere (another client, an OBS hotkey): next/previous go on from there."""
        if name in self.names:
            self.index = self.names.index(name)

    def key(self, key: str) -> str | None:
        """The preset to switch to for ``key``, or None when the key means nothing (or there are no presets)."""
        if not self.names or not key:
            return None
        if key.isdigit() and key != "0":
            by_number = [name for name in self.names if self.numbers[name] == int(key)]
            if not by_number:
                return None
            self.index = self.names.index(by_number[0])
        elif key in ("n", "+", "]", "\t"):
            self.index = (self.index + 1) % len(self.names)
        elif key in ("p", "-", "["):
            self.index = (self.index - 1) % len(self.names) if self.index >= 0 else len(self.names) - 1
        else:
            return None
        return self.names[self.index]

    def help(self) -> str:
        """``1:anime  2:watercolor …`` for the keys 1–9."""
        return "  ".join(f"{self.numbers[n]}:{n}" for n in self.names if self.numbers[n] <= 9)


def _latency_ms(frame: RestyledFrame) -> float | None:
    """Capture → restyled frame back here (the frame carries its input's capture timestamp)."""
    if frame.timestamp_ns <= 0:
        return None
    return (time.monotonic_ns() - frame.timestamp_ns) / 1e6


# ------------------------------------------------------------------------------------------------------------ live


def fit(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """``pixels`` at ``width``×``height`` (unchanged when they are): frames go to a session at its rounded size
    and come back to the size asked for (``sdlive.obs_bridge.cli.checks``)."""
    if pixels.shape[1] == width and pixels.shape[0] == height:
        return pixels
    import cv2

    shrinking = pixels.shape[0] * pixels.shape[1] > width * height
    return np.ascontiguousarray(cv2.resize(pixels, (width, height),
                                           interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR))


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
    flush_timeout_s: float = 10.0,
) -> PumpStats:
    """Stream ``source`` through ``session`` (a :class:`~sdlive.obs_bridge.client.SessionClient`) into ``sinks``.

    Runs until the source ends (and its last outputs are back), ``max_frames`` outputs were written,
    ``duration_s`` passed, ``stop`` is set, a key ``q``/Esc arrives on ``keys`` or a sink window is closed. Keys are
    handled on this thread (control calls are not made from two threads at once). The session may run at another
    size than the source (rounded to the daemon's multiple): frames are scaled to it and back.

    A source that is not self-paced (a file, a folder, a generated clip) is sent at its fps. A finite one is
    **flushed** at its end: its last frame is repeated until the output of the last real frame is back (the engine
    holds a few frames), those padding outputs are dropped, then it stops (after ``flush_timeout_s`` at most).

    ``steady_output`` writes at most one frame per source period (the daemon's frames come in bursts when its engine
    step holds its loop; a virtual camera wants a steady rate): up to ``JITTER_FRAMES`` wait their turn, older ones
    are dropped (newest wins) and counted. Each sink gets the capture timestamp of the frame it is written, so a
    timed file sink plays at real speed.

    The preset shown follows the session's (switched here, or elsewhere: the client library watches the daemon's
    events), and ``stats.daemon`` holds the daemon's own figures for the session (its drop counts). A daemon that
    goes silent or loses the session raises the client's ``DaemonUnavailable`` / ``SessionLost`` from here, with
    ``stats.last_output`` the last frame written (``sdlive cam`` holds it and reconnects).
    """
    sinks = list(sinks)
    stop = stop or threading.Event()
    stats = stats or PumpStats(preset=switcher.current if switcher else None)
    stats.finished = None
    if session.preset:
        stats.preset = session.preset
    sent_frames: OrderedDict[int, np.ndarray] = OrderedDict()  # timestamp_ns -> input pixels, for side by side
    sent_lock = threading.Lock()
    sender_done = threading.Event()
    flushed = threading.Event()
    sender_error: list[BaseException] = []
    last_real_ts: list[int] = []  # the last real frame's timestamp, once a finite source ended
    sw, sh = session.width, session.height

    def sender() -> None:
        period = 1.0 / source.fps if source.fps > 0 else 0.0
        t0 = time.perf_counter()
        n = 0
        padding = 0
        last: CapturedFrame | None = None
        try:
            while not stop.is_set():
                if (not source.self_paced or last_real_ts) and period:
                    delay = t0 + n * period - time.perf_counter()
                    if delay > 0:
                        stop.wait(delay)
                    elif delay < -1.0:  # fell more than a second behind (suspend, slow disk): don't burst
                        t0, n = time.perf_counter(), 0
                if last_real_ts:  # flushing: repeat the last frame until its output is back
                    if flushed.is_set() or last is None or padding >= 2 * (session.latency_frames + CHUNK_FRAMES):
                        return
                    padding += 1
                    n += 1
                    session.send(fit(last.pixels, sw, sh), timestamp_ns=max(time.monotonic_ns(), last_real_ts[0] + 1))
                    continue
                frame: CapturedFrame | None = source.read()
                if frame is None:
                    if last is None:
                        return
                    last_real_ts.append(last.timestamp_ns)
                    continue
                if last is None:  # the clock starts at the first frame (opening a source can take a while)
                    t0 = time.perf_counter()
                last = frame
                n += 1
                if side_by_side_view:
                    with sent_lock:
                        sent_frames[frame.timestamp_ns] = frame.pixels
                        while len(sent_frames) > 256:
                            sent_frames.popitem(last=False)
                session.send(fit(frame.pixels, sw, sh), timestamp_ns=frame.timestamp_ns)
                stats.note_in()
        except BaseException as exc:  # reported on the main thread
            sender_error.append(exc)
        finally:
            sender_done.set()

    thread = threading.Thread(target=sender, name="sdlive-capture", daemon=True)
    period = 1.0 / source.fps if steady_output and source.fps > 0 else 0.0
    ready: deque[tuple[np.ndarray, float | None, int]] = deque()
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
                    stats.preset_switches += 1
                    log.info("preset → %s", name)
            if session.preset and session.preset != stats.preset:  # switched here or elsewhere (PUB events)
                stats.preset = session.preset
                if switcher:
                    switcher.follow(session.preset)
            stats.daemon = session.daemon_stats or stats.daemon
            if stop.is_set() or any(s.closed for s in sinks):
                break

            # 1. deliver: at most one frame per output tick (a jitter buffer: the daemon's frames come in bursts
            #    when its engine step blocks, virtual cameras want a steady rate)
            now = time.monotonic()
            if ready and (period == 0.0 or now >= next_tick):
                pixels, latency, ts = ready.popleft()
                for sink in sinks:
                    sink.write(pixels, timestamp_ns=ts)
                stats.last_output = pixels
                stats.note_out(latency)
                next_tick = next_tick + period if now - next_tick < period else now + period
                if max_frames is not None and stats.frames_out >= max_frames:
                    break
            if flushed.is_set() and not ready:
                break  # a finite source: every output is written
            wait = RECV_POLL_S if not ready else max(0.0, min(RECV_POLL_S, next_tick - now))
            # 2. collect
            out = session.recv(timeout_s=wait)
            now = time.monotonic()
            if out is not None:
                last_output = now
                if last_real_ts and out.timestamp_ns >= last_real_ts[0]:
                    flushed.set()
                    if out.timestamp_ns > last_real_ts[0]:
                        continue  # a padding frame's output (the last real one was dropped)
                pixels = fit(out.pixels, source.width, source.height)
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
                ready.append((pixels, _latency_ms(out), out.timestamp_ns))
                if len(ready) > JITTER_FRAMES:  # more than a burst behind: newest wins
                    ready.popleft()
                    stats.dropped += 1
            elif ready:
                pass  # delivered on the next tick
            elif sender_done.is_set() and (not last_real_ts or now - last_output > flush_timeout_s):
                break  # the source ended (and the flush gave up waiting)
            elif now - last_output > idle_timeout_s and stats.frames_in > 0:
                raise PumpError(f"the daemon returned no frame for {idle_timeout_s:g} s (is it still running? "
                                f"see `sdlive status`)")
            if on_stats and now - last_stats >= STATS_PERIOD_S:
                last_stats = now
                on_stats(stats)
    finally:
        stop.set()
        thread.join(timeout=2.0)
        stats.finished = time.perf_counter()
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
            session.send(fit(pixels, session.width, session.height), timestamp_ns=ts)
            sent += 1

        # 2. collect what came back (briefly when only the daemon's input ring was full: it empties fast)
        out = session.recv(timeout_s=0.005 if blocked else RECV_POLL_S * 4)
        now = time.monotonic()
        if out is not None:
            index = ts_index.pop(out.timestamp_ns, None)
            if index is None or index < next_out:
                continue  # a frame we no longer wait for (or a daemon that doesn't echo timestamps: see below)
            last_progress = now
            out_pixels = fit(out.pixels, source.width, source.height)
            if total is not None and index >= total:
                index = total  # padding output: everything real before it is either written or lost
            while next_out < index:  # outputs the daemon dropped: hold the previous one (the first: the next)
                if last_pixels is None:
                    last_pixels = out_pixels
                stats.dropped += 1
                emit(next_out, last_pixels)
            if total is None or index < total:
                last_pixels = out_pixels
                emit(index, out_pixels)
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
