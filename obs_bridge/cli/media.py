"""`sdlive` commands: cam, render, demo (capture → daemon → sinks).

* ``sdlive cam``: a webcam (or file, screen, folder, generated clip, another session) restyled live into the virtual
  webcam, a preview window, a file or nowhere (stats only); keys switch presets while it runs.
* ``sdlive render``: a video file restyled file to file, every frame, with its fps and audio.
* ``sdlive demo``: the out-of-the-box run on any machine: a daemon with the ``tiny`` model, a generated clip,
  preset switches mid-stream, a side-by-side video and a stats table.

Nothing here imports torch: a daemon this command needs is started as a separate ``sdlive serve`` process.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from sdlive.daemon.protocol.constants import (
    DEFAULT_CONTROL_ADDRESS,
    DEFAULT_PUB_ADDRESS,
    STEPS_MAX,
    STEPS_MIN,
    host_of,
    is_loopback_address,
)

if TYPE_CHECKING:
    from rich.live import Live

    from sdlive.daemon.protocol.messages import HelloReply, SessionStats

    from ..client import DaemonClient, SessionClient
    from ..media.pump import PumpStats
    from ..media.sinks import FrameSink

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)

DAEMON_START_TIMEOUT_S = 180.0
DEMO_PRESETS = ("anime", "van-gogh", "cyberpunk")


class CommandError(Exception):
    """Shown as ``error: …`` with exit code 1."""


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


# ------------------------------------------------------------------------------------------------------ local daemon


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp_host_port(address: str) -> tuple[str, int]:
    """(host, port) of a ``tcp://HOST:PORT`` endpoint; ValueError for anything else."""
    if not address.startswith("tcp://"):
        raise ValueError(f"not a TCP endpoint: {address!r}")
    return host_of(address), int(address.rsplit(":", 1)[1])


def _port_free(address: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(_tcp_host_port(address))
        return True
    except (OSError, ValueError):
        return False


class LocalDaemon:
    """An ``sdlive serve`` process this command starts, waits for (``hello``) and stops again (SIGTERM, then kill)."""

    def __init__(self, *, model: str | None = None, device: str | None = None, token: str | None = None,
                 control: str | None = None, pub: str | None = None) -> None:
        self.model = model
        self.device = device
        self.token = token
        self.control = control or f"tcp://127.0.0.1:{_free_port()}"
        self.pub = pub or f"tcp://127.0.0.1:{_free_port()}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._log: IO[bytes] | None = None

    def start(self, *, timeout_s: float = DAEMON_START_TIMEOUT_S) -> str:
        from ..client import DaemonClient, DaemonUnavailable

        cmd = [sys.executable, "-c", "from sdlive.obs_bridge.cli import main; main()", "serve", "--no-ui",
               "--control", self.control, "--pub", self.pub]
        if self.model:
            cmd += ["--model", self.model]
        if self.device:
            cmd += ["--device", self.device]
        if self.token:
            cmd += ["--token", self.token]
        fd, name = tempfile.mkstemp(prefix="sdlive-daemon-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        process = self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        with DaemonClient(self.control, token=self.token, timeout_s=1.0) as dc:
            while True:
                if process.poll() is not None:
                    tail = self.log_tail()
                    self.stop()
                    raise CommandError(f"the local daemon exited with code {process.returncode} while starting"
                                       f"{': ' + tail if tail else ''}")
                try:
                    dc.hello()
                    return self.control
                except DaemonUnavailable:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise CommandError(f"the local daemon did not answer within {timeout_s:g} s "
                                           f"(log: {self.log_path})") from None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        p = self.process
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def daemon_address(daemon: str | None, *, token: str | None, model: str | None, device: str | None,
                   purpose: str, always_start: bool = False) -> Iterator[str]:
    """Yield the control address to use: ``daemon`` as given, else the default one if a daemon answers there, else a
    daemon started for this command (on the default ports when they are free) and stopped afterwards."""
    from ..client import DaemonClient, DaemonUnavailable

    if daemon:
        yield daemon
        return
    if not always_start:
        try:
            with DaemonClient(DEFAULT_CONTROL_ADDRESS, token=token, timeout_s=1.0) as dc:
                dc.hello()
            yield DEFAULT_CONTROL_ADDRESS
            return
        except DaemonUnavailable:
            pass
    defaults_free = not always_start and _port_free(DEFAULT_CONTROL_ADDRESS) and _port_free(DEFAULT_PUB_ADDRESS)
    local = LocalDaemon(model=model, device=device, token=token,
                        control=DEFAULT_CONTROL_ADDRESS if defaults_free else None,
                        pub=DEFAULT_PUB_ADDRESS if defaults_free else None)
    label = f"model {model}" if model else "its default model"
    with err_console.status(f"starting a local sdlive daemon for {purpose} ({label}) at {local.control} …"):
        address = local.start()
    err_console.print(f"[dim]local daemon at {address} (stops when this command ends; log: {local.log_path})[/]")
    try:
        yield address
    finally:
        local.stop()


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
    """A DaemonClient for ``address``; fails at once (instead of after the timeout) when nothing listens on a TCP
    port of this machine."""
    from ..client import DaemonClient

    if address.startswith("tcp://") and is_loopback_address(address):
        try:
            host, port = _tcp_host_port(address)
            with socket.create_connection(("127.0.0.1" if host == "localhost" else host, port), timeout=1.0):
                pass
        except ConnectionRefusedError:
            raise CommandError(f"no sdlive daemon is listening at {address}: start one with `sdlive serve` "
                               f"(or leave out --daemon to have this command start one)") from None
        except (OSError, ValueError):
            pass  # let the client's own timeout decide
    return DaemonClient(address, token=token, timeout_s=CONTROL_TIMEOUT_S)


def _preset_names(dc: DaemonClient) -> list[str]:
    return [p.name for p in dc.list_presets().presets]


def _check_preset(names: list[str], preset: str | None, address: str) -> None:
    if preset is not None and names and preset not in names:
        raise CommandError(f"unknown preset {preset!r} on the daemon at {address}: use one of {', '.join(names)}")


# ------------------------------------------------------------------------------------------------------ commands


def cam(
    input: Annotated[str, typer.Option("--input", "-i", help="webcam:N | webcam:NAME | FILE | DIR | screen[:x,y,w,h] | synthetic[:N] | attach:SESSION")] = "webcam:0",
    preset: Annotated[str | None, typer.Option("--preset", "-p", help="Preset to start with (see `sdlive status`).")] = None,
    output: Annotated[list[str] | None, typer.Option("--output", "-o", help="vcam[:BACKEND] | window | file:PATH | none (repeatable; default vcam).")] = None,
    daemon: Annotated[str | None, typer.Option("--daemon", help="Daemon control address; default: a local daemon, started if none answers.")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="SDLIVE_TOKEN", help="Auth token of a remote daemon.")] = None,
    attach: Annotated[str | None, typer.Option("--attach", help="Mirror an existing session's output (e.g. an OBS filter's) instead of capturing.")] = None,
    width: Annotated[int | None, typer.Option("--width", help="Frame width (default: the input's).")] = None,
    height: Annotated[int | None, typer.Option("--height", help="Frame height (default: the input's).")] = None,
    fps: Annotated[float | None, typer.Option("--fps", help="Frame rate (default: the input's).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=STEPS_MIN, max=STEPS_MAX, help=_STEPS_HELP)] = None,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Output input | restyled, twice as wide.")] = False,
    vcam_device: Annotated[str | None, typer.Option("--vcam-device", help="Virtual camera device (e.g. /dev/video10).")] = None,
    frames: Annotated[int | None, typer.Option("--frames", min=1, help="Stop after this many output frames.")] = None,
    duration: Annotated[float | None, typer.Option("--duration", min=0.1, help="Stop after this many seconds.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model of a daemon this command starts (default: the daemon's).")] = None,
    no_keys: Annotated[bool, typer.Option("--no-keys", help="Don't read preset keys from the terminal.")] = False,
) -> None:
    """Restyle a webcam (or any input) live into a virtual webcam for Zoom/Discord/Meet, a window or a file.

    Keys while it runs: 1–9 pick a preset, n/p the next/previous one, q quits.
    """
    from ..media.capture import open_source
    from ..media.pump import PresetSwitcher, PumpStats, run_live

    output = output or ["vcam"]
    if attach and input != "webcam:0":
        raise _fail("use either --input or --attach, not both", 2)
    try:
        if attach or input.startswith("attach:"):
            _mirror(attach or input.split(":", 1)[1], output=output, daemon=daemon, token=token, width=width,
                    height=height, fps=fps, vcam_device=vcam_device, frames=frames, duration=duration)
            return
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(open_source(input, width=width, height=height, fps=fps, loop=True))
            sink_w = source.width * (2 if side_by_side else 1)
            sinks = [stack.enter_context(_open_sink(o, sink_w, source.height, source.fps, vcam_device)) for o in output]
            address = stack.enter_context(daemon_address(daemon, token=token, model=model, device=None, purpose="cam"))
            dc = stack.enter_context(_connect(address, token))
            names = _preset_names(dc)
            _check_preset(names, preset, address)
            session = stack.enter_context(dc.open_session(
                width=source.width, height=source.height, fps=source.fps, pixel_format="bgr24", preset=preset,
                params={"steps": steps} if steps else None, client="sdlive-cam"))
            switcher = PresetSwitcher(names, session.preset or preset)
            stats = PumpStats(preset=switcher.current or session.preset or preset)
            described = ", ".join(_describe_sink(s) for s in sinks)
            err_console.print(f"[bold]sdlive cam[/]: {source.description} {source.width}x{source.height}@{source.fps:g} "
                              f"→ session {session.session_id} ({session.transport}) → {described}")
            if names and not no_keys:
                keys_help = "  ".join(f"{i + 1}:{n}" for i, n in enumerate(names[:9]))
                err_console.print(f"[dim]keys: {keys_help}  n/p: next/previous  q: quit[/]")
            keys = None if no_keys else stack.enter_context(KeyReader()).keys
            with StatsLine() as line:
                stats = run_live(source, session, sinks, side_by_side_view=side_by_side, max_frames=frames,
                                 duration_s=duration, keys=keys, switcher=switcher, on_stats=line, stats=stats)
        err_console.print(f"done: {stats.frames_out} frames out of {stats.frames_in} in {stats.elapsed_s:.1f} s, "
                          f"{stats.dropped} dropped")
    except BaseException as exc:
        _reraise_as_exit(exc)


def _open_sink(spec: str, width: int, height: int, fps: float, vcam_device: str | None,
               audio_from: str | None = None) -> FrameSink:
    from ..media.sinks import open_sink

    return open_sink(spec, width=width, height=height, fps=fps, vcam_device=vcam_device, audio_from=audio_from)


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

    address = daemon or DEFAULT_CONTROL_ADDRESS
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open_source(f"attach:{session_id}", width=width, height=height, fps=fps,
                                                 daemon=address, token=token))
        sinks = [stack.enter_context(_open_sink(o, source.width, source.height, source.fps, vcam_device)) for o in output]
        err_console.print(f"[bold]sdlive cam[/]: mirroring session {session_id} → {', '.join(_describe_sink(s) for s in sinks)}")
        stats = PumpStats(preset=f"attach {session_id}")
        started = time.monotonic()
        with StatsLine() as line:
            for frame in source:
                for s in sinks:
                    s.write(frame.pixels)
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
    preset: Annotated[str | None, typer.Option("--preset", "-p", help="Preset (see `sdlive status`).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=STEPS_MIN, max=STEPS_MAX, help=_STEPS_HELP)] = None,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Write input | restyled, twice as wide.")] = False,
    daemon: Annotated[str | None, typer.Option("--daemon", help="Daemon control address; default: a local daemon, started if none answers.")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="SDLIVE_TOKEN")] = None,
    width: Annotated[int | None, typer.Option("--width", help="Restyle at this width (default: the input's).")] = None,
    height: Annotated[int | None, typer.Option("--height", help="Restyle at this height (default: the input's).")] = None,
    frames: Annotated[int | None, typer.Option("--frames", min=1, help="Only the first N frames.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model of a daemon this command starts.")] = None,
) -> None:
    """Restyle a video file to a new file: every frame, the input's fps, its audio kept.

    The output has exactly as many frames as the input: the daemon answers a few frames late (its latency), so
    after the last frame the renderer repeats it until every real frame is back and drops those padding outputs.
    """
    from ..media.capture import open_source
    from ..media.pump import run_offline

    existed = output.exists()
    try:
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(open_source(input, width=width, height=height))
            if source.frame_count is None and frames is None:
                raise CommandError(f"{source.description} has no end: render needs a file, an image folder, "
                                   f"synthetic:N, or --frames N")
            if Path(input).resolve() == output.resolve():
                raise CommandError("the output would overwrite the input: choose another --output")
            fps = getattr(source, "native_fps", None) or source.fps
            audio = input if Path(input).is_file() else None
            sink = stack.enter_context(_open_sink(f"file:{output}",
                                                  source.width * (2 if side_by_side else 1), source.height, fps,
                                                  None, audio_from=audio))
            address = stack.enter_context(daemon_address(daemon, token=token, model=model, device=None, purpose="render"))
            dc = stack.enter_context(_connect(address, token))
            _check_preset(_preset_names(dc), preset, address)
            session = stack.enter_context(dc.open_session(
                width=source.width, height=source.height, fps=fps, pixel_format="bgr24", preset=preset,
                params={"steps": steps} if steps else None, client="sdlive-render"))
            total = min(x for x in (source.frame_count, frames) if x is not None)
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[fps]:>5.1f} fps"), TimeRemainingColumn(), console=err_console) as bar:
                task = bar.add_task(f"rendering {Path(input).name} ({session.preset or preset or 'default'})",
                                    total=total, fps=0.0)
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




def _pick_demo_model(device: str | None) -> tuple[str, str]:
    """The model the demo runs: a real one whose weights are on disk (and a GPU to run it, unless ``--device`` says
    otherwise), else ``tiny`` (random weights, nothing to download, real-time on a CPU).

    Asked of a separate interpreter: the daemon side (torch) is never imported into this client process."""
    import json

    try:
        probe = subprocess.run([sys.executable, "-m", "sdlive.daemon.model.probe"], capture_output=True, text=True, timeout=120,
                               stdin=subprocess.DEVNULL)
        found = json.loads(probe.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return "tiny", "could not look for downloaded models"
    if "error" in found:
        return "tiny", f"no daemon-side model code ({found['error']})"
    real = found.get("downloaded") or []
    if not real:
        return "tiny", "no downloaded weights: `sdlive models pull wan2.1-1.3b` for the real model"
    gpu = device == "cuda" or (device is None and found.get("cuda"))
    if not gpu:
        return "tiny", f"{real[0]} is downloaded but there is no GPU to run it in real time (--model {real[0]} forces it)"
    return real[0], "downloaded weights found"


def demo(
    frames: Annotated[int, typer.Option("--frames", min=8, help="Length of the generated clip in frames.")] = 90,
    size: Annotated[int, typer.Option("--size", min=32, help="Frame width and height of the clip.")] = 256,
    fps: Annotated[float, typer.Option("--fps", min=1.0, help="Frame rate of the clip.")] = 15.0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Side-by-side video to write.")] = Path("sdlive-demo.mp4"),
    presets: Annotated[str | None, typer.Option("--presets", help=f"Comma-separated presets to switch through (default: {', '.join(DEMO_PRESETS)}).")] = None,
    input: Annotated[str | None, typer.Option("--input", "-i", help="Use this clip instead of the generated one.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model for the demo's daemon (default: real weights if downloaded, else tiny).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu | cuda for the demo's daemon.")] = None,
    daemon: Annotated[str | None, typer.Option("--daemon", help="Use this running daemon instead of starting one.")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="SDLIVE_TOKEN")] = None,
) -> None:
    """The out-of-the-box demo: start a daemon, stream a clip through it switching presets mid-stream, write a
    side-by-side video (input | restyled) and print the stats. Runs offline, no GPU needed (``tiny`` model)."""
    from ..client import DaemonError
    from ..media.capture import open_source
    from ..media.pump import run_offline

    why = "given"
    if model is None and daemon is None:
        model, why = _pick_demo_model(device)
    existed = output.exists()
    try:
        with contextlib.ExitStack() as stack:
            spec = input or f"synthetic:{frames}"
            source = stack.enter_context(open_source(spec, width=size if not input else None,
                                                     height=size if not input else None, fps=fps if not input else None))
            n = min(x for x in (source.frame_count, frames) if x is not None) if source.frame_count else frames
            clip_fps = getattr(source, "native_fps", None) or source.fps
            sink = stack.enter_context(_open_sink(f"file:{output}", source.width * 2, source.height, clip_fps, None,
                                                  audio_from=input if input and Path(input).is_file() else None))
            err_console.print(f"[bold]sdlive demo[/]: {source.description} {source.width}x{source.height}, {n} frames "
                              f"at {clip_fps:g} fps; model {model or 'of the daemon'} ({why})")
            address = stack.enter_context(daemon_address(daemon, token=token, model=model, device=device,
                                                         purpose="the demo", always_start=daemon is None))
            dc = stack.enter_context(_connect(address, token))
            hello = dc.hello()
            available = _preset_names(dc)
            wanted = [p.strip() for p in presets.split(",") if p.strip()] if presets else \
                [p for p in DEMO_PRESETS if p in available] or available[:3]
            for p in wanted:
                _check_preset(available, p, address)
            if not wanted:
                raise CommandError(f"the daemon at {address} has no presets to switch through")
            # switch at equal intervals: frame 0 gets the first preset, then each next one a segment later
            schedule = {round(i * n / len(wanted)): name for i, name in enumerate(wanted)}
            session = stack.enter_context(dc.open_session(width=source.width, height=source.height, fps=clip_fps,
                                                          pixel_format="bgr24", preset=wanted[0], client="sdlive-demo"))
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
    if isinstance(exc, (SourceError, SinkError, DaemonUnavailable, InvalidRequest, PumpError, CommandError)):
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
