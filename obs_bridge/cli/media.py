"""`sdlive` commands: cam, render, demo (capture → daemon → sinks).

* ``sdlive cam``: a webcam (or file, screen, folder, generated clip, another session) restyled live into the virtual
  webcam, a preview window, a file or nowhere (stats only); keys switch presets while it runs.
* ``sdlive render``: a video file restyled file to file, every frame, with its fps and audio.
* ``sdlive demo``: the out-of-the-box run on any machine: a daemon with the shipped ``mini`` model (without real
  weights), a generated clip,
  preset switches mid-stream, a side-by-side video and a stats table.

Nothing here imports torch: a daemon this command needs is started as a separate ``sdlive serve`` process.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from sdlive.daemon.protocol.constants import (
    RECONNECT_INTERVAL_INIT_S,
    RECONNECT_INTERVAL_MAX_S,
    STEPS_MAX,
    STEPS_MIN,
    is_loopback_address,
)

from .autostart import AutoStartError, DaemonInUse, daemon_for
from .checks import CheckError, check_params, check_preset_on_disk, session_size, size_note
from .connect import Target, resolve_target

if TYPE_CHECKING:
    from rich.live import Live

    from sdlive.daemon.protocol.messages import HelloReply, SessionStats

    from ..client import DaemonClient, SessionClient
    from ..media.capture import FrameSource
    from ..media.pump import PresetSwitcher, PumpStats
    from ..media.sinks import FrameSink

err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # a log line is one line, in a pipe too
out_console = Console(highlight=False)

DEMO_PRESETS = ("anime", "van-gogh", "cyberpunk")
MINI_DEMO_PRESETS = ("mini-cartoon", "mini-thermal", "mini-pencil-sketch")
"""What the demo switches through on the ``mini`` model, which knows only its own style prompts (docs/mini.md)."""


class CommandError(Exception):
    """Shown as ``error: …`` with exit code 1."""


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


# ------------------------------------------------------------------------------------------------------ keys


class KeyReader:
    """Keys typed in the terminal, delivered on a queue. A TTY is switched to cbreak mode (restored on stop); a
    non-TTY stdin (a pipe) is read line by line, each character a key; Windows uses msvcrt."""

    def __init__(self) -> None:
        self.keys: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved: list[Any] | None = None  # termios attributes to restore

    def start(self) -> KeyReader:
        stdin = sys.stdin
        if stdin is None or stdin.closed:
            return self
        try:
            fd = stdin.fileno()
        except (OSError, ValueError, AttributeError):
            return self  # e.g. a test runner's stdin: no keys
        if sys.platform == "win32":
            target = self._run_msvcrt
        elif os.isatty(fd):
            import termios
            import tty

            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            target = self._run_tty
        else:
            target = self._run_lines
        self._thread = threading.Thread(target=target, args=(fd,), name="sdlive-keys", daemon=True)
        self._thread.start()
        return self

    def _run_tty(self, fd: int) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                ch = os.read(fd, 1).decode(errors="ignore")
                if ch:
                    self.keys.put(ch)

    def _run_lines(self, fd: int) -> None:
        while not self._stop.is_set():
            line = sys.stdin.readline()
            if not line:
                return
            for ch in line.strip():
                self.keys.put(ch)

    def _run_msvcrt(self, fd: int) -> None:  # pragma: no cover - Windows
        if sys.platform != "win32":
            return
        import msvcrt

        while not self._stop.is_set():
            if msvcrt.kbhit():
                self.keys.put(msvcrt.getwch())
            else:
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None

    def __enter__(self) -> KeyReader:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------------ stats output


class StatsLine:
    """The live stats line: redrawn in place on a terminal, one line a second otherwise."""

    def __init__(self, console: Console = err_console, *, every_s: float = 1.0) -> None:
        self.console = console
        self.every_s = every_s
        self._last = 0.0
        self._live: Live | None = None
        if console.is_terminal:
            from rich.live import Live
            from rich.text import Text

            self._live = Live(Text(""), console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> StatsLine:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __call__(self, stats: PumpStats) -> None:
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(stats.line()))
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.console.print(stats.line())

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)


_STEPS_HELP = f"Denoising steps {STEPS_MIN}–{STEPS_MAX} (default: the preset's)."

CONTROL_TIMEOUT_S = 20.0
"""Control replies wait for the daemon's current engine step: on a CPU under load that can take seconds."""


def _connect(address: str, token: str | None) -> DaemonClient:
    """The command's control client of the daemon at ``address`` (already known to answer)."""
    from ..client import DaemonClient

    return DaemonClient(address, token=token, timeout_s=CONTROL_TIMEOUT_S)


def _preset_names(dc: DaemonClient) -> list[str]:
    return [p.name for p in dc.list_presets().presets]


def _check_preset(names: list[str], preset: str | None, address: str) -> None:
    if preset is not None and names and preset not in names:
        raise CommandError(f"unknown preset {preset!r} on the daemon at {address}: use one of {', '.join(names)}")


def _switcher(dc: DaemonClient, current: str | None) -> PresetSwitcher:
    """Number keys → presets, numbered as `sdlive preset` lists them (a preset's hotkey digit, then name order)."""
    from ..media.pump import PresetSwitcher, preset_numbers

    presets = dc.list_presets().presets
    numbers = preset_numbers((p.name, p.hotkey) for p in presets)
    return PresetSwitcher([p.name for p in presets], current, numbers)


def _target(daemon: str | None, token: str | None) -> Target:
    try:
        return resolve_target(daemon, token, what="--daemon")
    except Exception as exc:  # TargetError: one line
        raise CommandError(str(exc)) from None


def _checked_size(source: FrameSource) -> tuple[int, int]:
    """The session size for ``source`` (rounded as the OBS filter does; said in one line when it is)."""
    size = session_size(source.width, source.height)
    note = size_note(source.width, source.height)
    if note:
        err_console.print(f"[dim]{note}[/]")
    return size


def _prechecks(target: Target, preset: str | None) -> None:
    """What can be checked before a daemon is started for this command: the preset against the preset files."""
    from .autostart import port_free

    if not target.explicit and is_loopback_address(target.control) and port_free(target.control):
        check_preset_on_disk(preset)  # nothing listens there: a daemon will be started, with these presets


# ------------------------------------------------------------------------------------------------------ commands


def cam(
    input: Annotated[str, typer.Option("--input", "-i", help="webcam:N | webcam:NAME | FILE | DIR | screen[:x,y,w,h] | synthetic[:N] | attach:SESSION")] = "webcam:0",
    preset: Annotated[str | None, typer.Option("--preset", "-p", help="Preset to start with (`sdlive preset` lists them).")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Restyle with this prompt (over the preset's).")] = None,
    output: Annotated[list[str] | None, typer.Option("--output", "-o", help="vcam[:BACKEND] | window | file:PATH | none (repeatable; default vcam).")] = None,
    daemon: Annotated[str | None, typer.Option("--daemon", help="Daemon control address (default: SDLIVE_CONTROL, config.toml, tcp://127.0.0.1:5557); a local daemon is started if none answers there.")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="SDLIVE_TOKEN", help="Auth token of a remote daemon.")] = None,
    attach: Annotated[str | None, typer.Option("--attach", help="Mirror an existing session's output (e.g. an OBS filter's) instead of capturing.")] = None,
    width: Annotated[int | None, typer.Option("--width", min=1, help="Frame width (default: the input's; alone: keeps the aspect ratio).")] = None,
    height: Annotated[int | None, typer.Option("--height", min=1, help="Frame height (default: the input's; alone: keeps the aspect ratio).")] = None,
    fps: Annotated[float | None, typer.Option("--fps", min=0.1, help="Frame rate (default: the input's).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=STEPS_MIN, max=STEPS_MAX, help=_STEPS_HELP)] = None,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Output input | restyled, twice as wide.")] = False,
    vcam_device: Annotated[str | None, typer.Option("--vcam-device", help="Virtual camera device (e.g. /dev/video10).")] = None,
    frames: Annotated[int | None, typer.Option("--frames", min=1, help="Stop after this many output frames.")] = None,
    duration: Annotated[float | None, typer.Option("--duration", min=0.1, help="Stop after this many seconds.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model of a daemon this command starts (default: real weights if downloaded and a GPU is there, else mini).")] = None,
    no_keys: Annotated[bool, typer.Option("--no-keys", help="Don't read preset keys from the terminal.")] = False,
) -> None:
    """Restyle a webcam (or any input) live into a virtual webcam for Zoom/Discord/Meet, a window or a file.

    Keys while it runs: the preset numbers (`sdlive preset` lists them) pick a preset, n/p the next/previous one,
    q quits. When the daemon stops or restarts, the camera holds its last frame and reconnects.
    """
    from ..client import DaemonError
    from ..media.capture import open_source
    from ..media.pump import PumpStats

    output = output or ["vcam"]
    if attach and input != "webcam:0":
        raise _fail("use either --input or --attach, not both", 2)
    try:
        if attach or input.startswith("attach:"):
            _mirror(attach or input.split(":", 1)[1], output=output, daemon=daemon, token=token, width=width,
                    height=height, fps=fps, vcam_device=vcam_device, frames=frames, duration=duration)
            return
        params = check_params(prompt=prompt, steps=steps)
        target = _target(daemon, token)
        _prechecks(target, preset)
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(open_source(input, width=width, height=height, fps=fps, loop=True))
            size = _checked_size(source)
            sink_w = source.width * (2 if side_by_side else 1)
            sinks = [stack.enter_context(_open_sink(o, sink_w, source.height, source.fps, vcam_device, timed=True))
                     for o in output]
            use = stack.enter_context(daemon_for(target, model=model, device=None, purpose="cam"))
            dc = stack.enter_context(_connect(use.address, target.token))
            _check_preset(_preset_names(dc), preset, use.address)

            def open_session(current: str | None = preset) -> SessionClient:
                """A session with the current style (after a reconnect: the preset switched to, when the new
                daemon has it)."""
                try:
                    return dc.open_session(width=size[0], height=size[1], fps=source.fps, pixel_format="bgr24",
                                           preset=current, params=params, client="sdlive-cam")
                except DaemonError as exc:
                    if current is None or exc.code != "unknown_preset":
                        raise
                    return open_session(None)

            session = open_session()
            stack.callback(lambda: session.close())
            switcher = _switcher(dc, session.preset or preset)
            stats = PumpStats(preset=session.preset or preset)
            described = ", ".join(_describe_sink(s) for s in sinks)
            err_console.print(f"[bold]sdlive cam[/]: {source.description} {source.width}x{source.height}@{source.fps:g} "
                              f"→ session {session.session_id} ({session.transport}, model {use.model}) → {described}")
            if switcher.names and not no_keys:
                err_console.print(f"[dim]keys: {switcher.help()}  n/p: next/previous  q: quit[/]")
            keys = None if no_keys else stack.enter_context(KeyReader()).keys
            with StatsLine() as line:
                while True:
                    stats = _live_until_lost(source, session, sinks, side_by_side=side_by_side, frames=frames,
                                             duration=duration, keys=keys, switcher=switcher, line=line, stats=stats)
                    if stats.lost is None:
                        break
                    session.close()
                    fresh = _reconnect(use, target, open_session, sinks, stats, keys)
                    if fresh is None:
                        break
                    session = fresh
                    switcher.follow(session.preset)
            final = _final_daemon_stats(session)
            if final is not None:
                stats.daemon = final
        err_console.print(f"done: {stats.frames_out} frames out of {stats.frames_in} in {stats.elapsed_s:.1f} s, "
                          f"{stats.drops()}{_reconnects(stats.reconnects)}")
    except BaseException as exc:
        _reraise_as_exit(exc)


def _reconnects(n: int) -> str:
    return f", {n} reconnect{'s' if n != 1 else ''}" if n else ""


def _live_until_lost(source: FrameSource, session: SessionClient, sinks: list[FrameSink], *, side_by_side: bool,
                     frames: int | None, duration: float | None, keys: Any, switcher: PresetSwitcher,
                     line: StatsLine, stats: PumpStats) -> PumpStats:
    """``run_live`` until it ends (``stats.lost`` None) or the daemon goes away (``stats.lost``: why)."""
    from ..client import DaemonUnavailable, SessionLost
    from ..media.pump import run_live

    # --duration is wall time from the start, reconnects included (run_live counts from its own start)
    left = None if duration is None else max(0.1, duration - (time.perf_counter() - stats.started))
    stats.lost = None
    try:
        return run_live(source, session, sinks, side_by_side_view=side_by_side, max_frames=frames,  # stats' total
                        duration_s=left, keys=keys, switcher=switcher, on_stats=line, stats=stats)
    except (DaemonUnavailable, SessionLost) as exc:
        stats.lost = exc.message
        return stats


def _reconnect(use: DaemonInUse, target: Target, open_session: Any, sinks: list[FrameSink], stats: PumpStats,
               keys: Any) -> SessionClient | None:
    """The daemon went away: hold the last frame on the sinks (a virtual camera keeps showing it) and open a new
    session as soon as a daemon answers again (the backoff every client uses); a daemon this command started and
    that exited is started again. None when the user quits (q) meanwhile."""
    from ..client import DaemonClient, DaemonError

    err_console.print(f"[yellow]{stats.lost}[/]")
    err_console.print(f"[yellow]holding the last frame; reconnecting to {use.address} … (q quits)[/]")
    backoff = RECONNECT_INTERVAL_INIT_S
    period = 1.0 / sinks[0].fps if sinks and sinks[0].fps > 0 else 1.0 / 30
    while True:
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline:  # hold: the last frame at the camera's rate
            if stats.last_output is not None:
                for sink in sinks:
                    sink.write(stats.last_output, timestamp_ns=time.monotonic_ns())
                stats.held += 1
            while keys is not None and not keys.empty():
                if keys.get_nowait() in ("q", "\x1b", "\x03"):
                    return None
            if any(s.closed for s in sinks):
                return None
            time.sleep(period)
        if use.started is not None and not use.started.running:
            err_console.print(f"[yellow]the local daemon exited ({use.started.log_tail(2)}); starting it again[/]")
            try:
                use.started.start()
            except Exception as exc:  # noqa: BLE001 - AutoStartError: keep holding, try again later
                err_console.print(f"[yellow]{exc}[/]")
        try:
            with DaemonClient(use.address, token=target.token, timeout_s=max(backoff, 0.5)) as probe:
                probe.hello()
            session = open_session(stats.preset)
        except DaemonError:
            backoff = min(backoff * 2, RECONNECT_INTERVAL_MAX_S)
            continue
        stats.reconnects += 1
        err_console.print(f"[green]reconnected: session {session.session_id} on {use.address}[/]")
        return session


def _final_daemon_stats(session: SessionClient) -> SessionStats | None:
    """The daemon's own figures for the session before it closes (its drop counts), or None when it is gone."""
    from ..client import DaemonError

    try:
        return session.status() if not session.closed else session.daemon_stats
    except DaemonError:
        return session.daemon_stats


def _open_sink(spec: str, width: int, height: int, fps: float, vcam_device: str | None,
               audio_from: str | None = None, timed: bool = False) -> FrameSink:
    from ..media.sinks import open_sink

    return open_sink(spec, width=width, height=height, fps=fps, vcam_device=vcam_device, audio_from=audio_from,
                     timed=timed)


def _describe_sink(sink: FrameSink) -> str:
    from ..media.sinks import VideoFileSink, VirtualCameraSink

    if isinstance(sink, VirtualCameraSink):
        return f"virtual camera {sink.device} ({sink.backend})"
    if isinstance(sink, VideoFileSink):
        return f"file {sink.path}"
    return sink.kind


def _mirror(session_id: str, *, output: list[str], daemon: str | None, token: str | None, width: int | None,
            height: int | None, fps: float | None, vcam_device: str | None, frames: int | None,
            duration: float | None) -> None:
    """`cam --attach SESSION`: copy an existing session's output to the sinks (no new session, no restyling)."""
    from ..media.capture import open_source
    from ..media.pump import PumpStats

    target = _target(daemon, token)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open_source(f"attach:{session_id}", width=width, height=height, fps=fps,
                                                 daemon=target.control, token=target.token))
        sinks = [stack.enter_context(_open_sink(o, source.width, source.height, source.fps, vcam_device)) for o in output]
        err_console.print(f"[bold]sdlive cam[/]: mirroring session {session_id} → {', '.join(_describe_sink(s) for s in sinks)}")
        stats = PumpStats(preset=f"attach {session_id}")
        started = time.monotonic()
        with StatsLine() as line:
            for frame in source:
                for s in sinks:
                    s.write(frame.pixels, timestamp_ns=frame.timestamp_ns)
                stats.note_in()
                stats.note_out(None)
                line(stats)
                if (frames and stats.frames_out >= frames) or (duration and time.monotonic() - started >= duration):
                    break
                if any(s.closed for s in sinks):
                    break


def render(
    input: Annotated[str, typer.Argument(help="Input video file (or an image folder, or synthetic:N).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output video (.mp4 .mkv .mov .webm .avi).")],
    preset: Annotated[str | None, typer.Option("--preset", "-p", help="Preset (`sdlive preset` lists them).")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Restyle with this prompt (over the preset's).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=STEPS_MIN, max=STEPS_MAX, help=_STEPS_HELP)] = None,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Write input | restyled, twice as wide.")] = False,
    daemon: Annotated[str | None, typer.Option("--daemon", help="Daemon control address (default: SDLIVE_CONTROL, config.toml, tcp://127.0.0.1:5557); a local daemon is started if none answers there.")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="SDLIVE_TOKEN")] = None,
    width: Annotated[int | None, typer.Option("--width", min=1, help="Restyle at this width (default: the input's; alone: keeps the aspect ratio).")] = None,
    height: Annotated[int | None, typer.Option("--height", min=1, help="Restyle at this height (default: the input's; alone: keeps the aspect ratio).")] = None,
    frames: Annotated[int | None, typer.Option("--frames", min=1, help="Only the first N frames.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model of a daemon this command starts (default: real weights if downloaded and a GPU is there, else mini).")] = None,
    live: Annotated[bool, typer.Option("--live", help="Pace the session like a live source (real time) instead of as fast as the model goes.")] = False,
) -> None:
    """Restyle a video file to a new file: every frame, the input's fps, its audio kept.

    As fast as the model goes (an offline session; --live paces it at the file's fps like a live source). The
    output has exactly as many frames as the input: the daemon answers a few frames late (its latency), so after
    the last frame the renderer repeats it until every real frame is back and drops those padding outputs. A size
    that is not a multiple of 16 is restyled at the size rounded down and scaled back.
    """
    from ..media.capture import open_source
    from ..media.pump import run_offline

    existed = output.exists()
    try:
        params = check_params(prompt=prompt, steps=steps)
        target = _target(daemon, token)
        _prechecks(target, preset)
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(open_source(input, width=width, height=height))
            if source.frame_count is None and frames is None:
                raise CommandError(f"{source.description} has no end: render needs a file, an image folder, "
                                   f"synthetic:N, or --frames N")
            if Path(input).resolve() == output.resolve():
                raise CommandError("the output would overwrite the input: choose another --output")
            size = _checked_size(source)
            fps = getattr(source, "native_fps", None) or source.fps
            audio = input if Path(input).is_file() else None
            sink = stack.enter_context(_open_sink(f"file:{output}",
                                                  source.width * (2 if side_by_side else 1), source.height, fps,
                                                  None, audio_from=audio))
            use = stack.enter_context(daemon_for(target, model=model, device=None, purpose="render"))
            dc = stack.enter_context(_connect(use.address, target.token))
            _check_preset(_preset_names(dc), preset, use.address)
            session = stack.enter_context(dc.open_session(
                width=size[0], height=size[1], fps=fps, pixel_format="bgr24", preset=preset,
                params=params, client="sdlive-render", pacing="live" if live else "offline"))
            total = min(x for x in (source.frame_count, frames) if x is not None)
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[fps]:>5.1f} fps"), TimeRemainingColumn(), console=err_console) as bar:
                style = "prompt" if prompt else (session.preset or preset or "default")
                task = bar.add_task(f"rendering {Path(input).name} ({style}, model {use.model})", total=total, fps=0.0)
                stats = run_offline(source, session, [sink], side_by_side_view=side_by_side, max_frames=frames,
                                    on_frame=lambda i: bar.update(task, completed=i + 1),
                                    on_stats=lambda s: bar.update(task, fps=s.mean_fps_out))
        audio_note = " with audio" if getattr(sink, "has_audio", False) else ""
        dropped = f", {stats.dropped} dropped by the daemon (held the previous frame)" if stats.dropped else ""
        err_console.print(f"wrote {output}: {sink.frames_sent} frames at {fps:g} fps, "
                          f"{sink.width}x{sink.height}{audio_note}{dropped}")
    except BaseException as exc:
        _remove_partial(output, existed)
        _reraise_as_exit(exc)


def demo(
    frames: Annotated[int, typer.Option("--frames", min=8, help="Length of the generated clip in frames.")] = 90,
    size: Annotated[int, typer.Option("--size", min=32, help="Frame width and height of the generated clip.")] = 256,
    fps: Annotated[float, typer.Option("--fps", min=1.0, help="Frame rate of the generated clip.")] = 15.0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Side-by-side video to write.")] = Path("sdlive-demo.mp4"),
    presets: Annotated[str | None, typer.Option("--presets", help=f"Comma-separated presets to switch through (default: {', '.join(DEMO_PRESETS)}).")] = None,
    input: Annotated[str | None, typer.Option("--input", "-i", help="Use this clip instead of the generated one.")] = None,
    width: Annotated[int | None, typer.Option("--width", min=1, help="With --input: restyle at this width (alone: keeps the aspect ratio).")] = None,
    height: Annotated[int | None, typer.Option("--height", min=1, help="With --input: restyle at this height (alone: keeps the aspect ratio).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model for the demo's daemon (default: real weights if downloaded and a GPU is there, else mini).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu | cuda for the demo's daemon.")] = None,
    daemon: Annotated[str | None, typer.Option("--daemon", help="Use this running daemon instead of starting one.")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="SDLIVE_TOKEN")] = None,
    live: Annotated[bool, typer.Option("--live", help="Pace the session like a live source (real time) instead of as fast as the model goes.")] = False,
) -> None:
    """The out-of-the-box demo: a clip restyled with preset switches mid-stream, as a side-by-side video.

    Starts a daemon of its own (real weights if downloaded and a GPU is there, else `mini`: no GPU needed),
    streams a generated clip (or --input) through it as fast as the model goes (--live: at the clip's fps),
    writes input | restyled and prints the stats.
    """
    from ..client import DaemonError
    from ..media.capture import open_source
    from ..media.pump import run_offline

    if (width or height) and not input:
        raise _fail("--width/--height go with --input (the generated clip takes --size)", 2)
    existed = output.exists()
    try:
        target = _target(daemon, token)
        wanted_given = [p.strip() for p in presets.split(",") if p.strip()] if presets else []
        if not target.explicit:
            for p in wanted_given:
                check_preset_on_disk(p)
        with contextlib.ExitStack() as stack:
            spec = input or f"synthetic:{frames}"
            source = stack.enter_context(open_source(spec, width=width if input else size,
                                                     height=height if input else size, fps=fps if not input else None))
            clip_size = _checked_size(source)
            n = min(x for x in (source.frame_count, frames) if x is not None) if source.frame_count else frames
            clip_fps = getattr(source, "native_fps", None) or source.fps
            sink = stack.enter_context(_open_sink(f"file:{output}", source.width * 2, source.height, clip_fps, None,
                                                  audio_from=input if input and Path(input).is_file() else None))
            err_console.print(f"[bold]sdlive demo[/]: {source.description} {source.width}x{source.height}, {n} frames "
                              f"at {clip_fps:g} fps")
            use = stack.enter_context(daemon_for(target, model=model, device=device, purpose="the demo", own=True))
            dc = stack.enter_context(_connect(use.address, target.token))
            hello = dc.hello()
            available = _preset_names(dc)
            demo_presets = MINI_DEMO_PRESETS if hello.model == "mini" else DEMO_PRESETS
            wanted = wanted_given or [p for p in demo_presets if p in available] or available[:3]
            for p in wanted:
                _check_preset(available, p, use.address)
            if not wanted:
                raise CommandError(f"the daemon at {use.address} has no presets to switch through")
            # switch at equal intervals: frame 0 gets the first preset, then each next one a segment later
            schedule = {round(i * n / len(wanted)): name for i, name in enumerate(wanted)}
            # offline: a clip on disk has no clock to keep, so it runs as fast as the model goes (--live paces it)
            session = stack.enter_context(dc.open_session(width=clip_size[0], height=clip_size[1], fps=clip_fps,
                                                          pixel_format="bgr24", preset=wanted[0], client="sdlive-demo",
                                                          pacing="live" if live else "offline"))
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[preset]} {task.fields[fps]:>5.1f} fps"), TimeRemainingColumn(),
                          console=err_console) as bar:
                task = bar.add_task("restyling", total=n, fps=0.0, preset=wanted[0])
                stats = run_offline(source, session, [sink], side_by_side_view=True, max_frames=n, schedule=schedule,
                                    label_presets=True,
                                    on_frame=lambda i: bar.update(task, completed=i + 1),
                                    on_stats=lambda s: bar.update(task, fps=s.mean_fps_out, preset=s.preset or ""))
            daemon_stats: SessionStats | None
            try:
                daemon_stats = session.status()
            except DaemonError:
                daemon_stats = None
        _print_demo_table(stats, hello, daemon_stats, session, wanted, output, sink, clip_fps)
    except BaseException as exc:
        _remove_partial(output, existed)
        _reraise_as_exit(exc)


def _remove_partial(output: Path, existed: bool) -> None:
    """A render that failed leaves no half-written file behind (one that was there before is the user's)."""
    if not existed:
        with contextlib.suppress(OSError):
            output.unlink()


def _reraise_as_exit(exc: BaseException) -> NoReturn:
    """Known failures become ``error: …`` and exit code 1 (130 for Ctrl-C); anything else propagates."""
    from ..client import DaemonError, DaemonUnavailable, InvalidRequest
    from ..media.capture import SourceError
    from ..media.pump import PumpError
    from ..media.sinks import SinkError

    if isinstance(exc, KeyboardInterrupt):
        raise typer.Exit(130) from None
    if isinstance(exc, DaemonUnavailable):
        raise _fail(exc.message) from None
    if isinstance(exc, (SourceError, SinkError, InvalidRequest, PumpError, CommandError, CheckError, AutoStartError)):
        raise _fail(str(exc)) from None
    if isinstance(exc, DaemonError):
        raise _fail(f"the daemon refused: {exc}") from None
    raise exc


def _print_demo_table(stats: PumpStats, hello: HelloReply, daemon_stats: SessionStats | None,
                      session: SessionClient, presets: list[str], output: Path, sink: FrameSink, fps: float) -> None:
    table = Table(title="sdlive demo", show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("model", f"{hello.model} on {hello.device}")
    table.add_row("session", f"{session.session_id} ({session.transport}, {session.width}x{session.height}, "
                             f"latency {session.latency_frames} frames)")
    table.add_row("presets", " → ".join(presets))
    table.add_row("frames", f"{stats.frames_in} in, {sink.frames_sent} written, {stats.dropped} dropped, "
                            f"{stats.padded} padding")
    table.add_row("throughput", f"{stats.mean_fps_out:.1f} fps (clip: {fps:g} fps), {stats.elapsed_s:.1f} s")
    p50, p95 = stats.latency_percentile(50), stats.latency_percentile(95)
    if p50 is not None and p95 is not None:
        table.add_row("latency", f"p50 {p50:.0f} ms, p95 {p95:.0f} ms (capture → restyled frame back)")
    if daemon_stats is not None and daemon_stats.stage_ms:
        table.add_row("engine stages", ", ".join(f"{k} {v:.0f} ms" for k, v in daemon_stats.stage_ms.items()))
    table.add_row("output", f"{output} ({sink.width}x{sink.height}, input | restyled)")
    out_console.print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `sdlive` app."""
    app.command("cam")(cam)
    app.command("render")(render)
    app.command("demo")(demo)
