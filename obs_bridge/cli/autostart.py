"""The daemon a media command (``cam``, ``render``, ``demo``) runs against: one rule for all of them.

1. The configured address (``--daemon``, else ``SDLIVE_CONTROL``, else ``control`` in config.toml, else the
   default; :mod:`.connect`). A daemon answering there is used as it is, and the command says which model it runs.
2. Nothing answers: an address given with ``--daemon`` or off this machine is an error (start that daemon); a
   local one gets a daemon started for this command, on the configured ports when they are free, with the best
   model this machine has (real weights when downloaded and a GPU is there, else the shipped ``mini``, else ``tiny``:
   :func:`pick_model`),
   and the command says which and why.
3. When the command ends, the daemon it started is stopped **unless another client has a session on it** (a
   ``render`` that reused the daemon a ``cam`` started): then it keeps running and the command says so. The
   daemon runs in a session of its own, so a Ctrl-C in this terminal does not reach it.

Nothing here imports torch: the daemon is a separate ``sdlive serve`` process, the model probe another interpreter.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rich.console import Console

from sdlive.daemon.protocol.constants import host_of, is_loopback_address

from .connect import Target

if TYPE_CHECKING:
    from sdlive.daemon.protocol.messages import HelloReply

__all__ = ["AutoStartError", "DaemonInUse", "LocalDaemon", "daemon_for", "pick_model"]

DAEMON_START_TIMEOUT_S = 180.0
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # a log line is one line, in a pipe too


class AutoStartError(Exception):
    """No daemon to run against, and none could be started; the message names the fix."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tcp_host_port(address: str) -> tuple[str, int]:
    """(host, port) of a ``tcp://HOST:PORT`` endpoint; ValueError for anything else."""
    if not address.startswith("tcp://"):
        raise ValueError(f"not a TCP endpoint: {address!r}")
    host = host_of(address)
    return ("127.0.0.1" if host == "localhost" else host), int(address.rsplit(":", 1)[1])


def port_free(address: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(_tcp_host_port(address))
        return True
    except (OSError, ValueError):
        return False


def pick_model(device: str | None) -> tuple[str, str]:
    """The model a daemon started here runs, and why: a real one whose weights are on disk (and a GPU to run it,
    unless ``device`` says otherwise), else ``mini`` (trained toy styles shipped in the package, real time on a CPU), else
    ``tiny`` (random weights).

    Asked of a separate interpreter: the daemon side (torch) is never imported into this client process."""
    try:
        probe = subprocess.run([sys.executable, "-m", "sdlive.daemon.model.probe"], capture_output=True, text=True,
                               timeout=120, stdin=subprocess.DEVNULL)
        found = json.loads(probe.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return "tiny", "could not look for downloaded models"
    if "error" in found:
        return "tiny", f"no daemon-side model code ({found['error']})"
    real = found.get("downloaded") or []
    # mini: a toy model trained on a CPU that ships in the package (docs/mini.md); tiny (random weights) otherwise
    small, toy = ("mini", "mini (toy styles trained on a CPU, shipped in the package)") if "mini" in (
        found.get("shipped") or []) else ("tiny", "tiny (random weights)")  # fmt: skip
    if not real:
        return small, f"no downloaded weights, so {toy}: `sdlive models pull wan2.1-1.3b` for the real model"
    gpu = (device or "").startswith("cuda") or (device is None and found.get("cuda"))
    if not gpu:
        return small, f"{real[0]} is downloaded but there is no GPU to run it in real time, so {toy} (--model {real[0]} forces it)"
    return real[0], "downloaded weights found"


class LocalDaemon:
    """An ``sdlive serve`` process this command starts, waits for (``hello``) and stops again (SIGTERM, then kill).

    It runs in a process session of its own: a Ctrl-C typed into this command's terminal does not stop it."""

    def __init__(self, *, model: str | None = None, device: str | None = None, token: str | None = None,
                 control: str | None = None, pub: str | None = None) -> None:
        self.model = model
        self.device = device
        self.token = token
        self.control = control or f"tcp://127.0.0.1:{free_port()}"
        self.pub = pub or f"tcp://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._log: IO[bytes] | None = None
        self.on_loading: Callable[[HelloReply], None] | None = None
        """Called with each ``hello`` of the daemon while it loads (a progress line)."""

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
                                                  stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        with DaemonClient(self.control, token=self.token, timeout_s=1.0) as dc:
            while True:
                if process.poll() is not None:
                    tail = self.log_tail()
                    self.stop()
                    raise AutoStartError(f"the local daemon exited with code {process.returncode} while starting"
                                         f"{': ' + tail if tail else ''}")
                try:
                    dc.hello()
                    break
                except DaemonUnavailable:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise AutoStartError(f"the local daemon did not answer within {timeout_s:g} s "
                                             f"(log: {self.log_path})") from None
            try:
                dc.wait_ready(max(1.0, deadline - time.monotonic()), on_loading=self.on_loading)
            except DaemonUnavailable as exc:
                self.stop()
                raise AutoStartError(f"{exc.message} (log: {self.log_path})") from None
        return self.control

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

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
        self.release()

    def release(self) -> None:
        """Let go of the process without stopping it (another client uses it)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class DaemonInUse:
    """The daemon a command runs against: its ``address``, the ``model`` it runs, and ``started`` when this
    command started it."""

    address: str
    model: str
    device: str
    started: LocalDaemon | None = None


def _answering(address: str, token: str | None) -> tuple[str, str] | None:
    """(model, device) of a daemon answering ``hello`` at ``address`` within a second, else None."""
    from ..client import DaemonClient, DaemonError, DaemonUnavailable

    try:
        with DaemonClient(address, token=token, timeout_s=1.0) as dc:
            hello = dc.hello()
            if getattr(hello, "state", "ready") != "ready":
                with err_console.status(f"the daemon at {address} is loading {hello.model} …") as spinner:
                    hello = dc.wait_ready(DAEMON_START_TIMEOUT_S,
                                          on_loading=lambda h: spinner.update(loading_line(address, h)))
            return hello.model, hello.device
    except DaemonUnavailable as exc:
        if "still loading" in exc.message:
            raise AutoStartError(exc.message) from None
        return None
    except DaemonError as exc:
        raise AutoStartError(f"the daemon at {address} refused: {exc}") from None


def loading_line(address: str, hello: HelloReply) -> str:
    """``the daemon at … is loading wan2.1-1.3b: loading the transformer (3 steps done, 42 s)``."""
    loading = getattr(hello, "loading", None)
    if loading is None:
        return f"the daemon at {address} is loading {hello.model} …"
    return (f"the daemon at {address} is loading {loading.model}: {loading.stage} ({loading.stages_done} steps done, "
            f"{loading.elapsed_s:.0f} s)")


def _other_sessions(address: str, token: str | None) -> int:
    from ..client import DaemonClient, DaemonError

    try:
        with DaemonClient(address, token=token, timeout_s=5.0) as dc:
            return len(dc.status().sessions)
    except DaemonError:
        return 0


@contextlib.contextmanager
def daemon_for(target: Target, *, model: str | None, device: str | None, purpose: str,
               own: bool = False) -> Iterator[DaemonInUse]:
    """The daemon ``purpose`` runs against, by the module's rule. ``own`` (the demo) always starts a fresh daemon
    on free ports unless the address was given explicitly."""
    start_here = own and not target.explicit
    if not start_here:
        found = _answering(target.control, target.token)
        if found is not None:
            note = ""
            if model and model != found[0]:
                note = f" (--model {model} is for a daemon this command starts; this one already runs {found[0]})"
            err_console.print(f"[dim]using the daemon at {target.control}: model {found[0]} on {found[1]}{note}[/]")
            yield DaemonInUse(target.control, found[0], found[1])
            return
        if target.explicit:
            raise AutoStartError(f"no sdlive daemon answered at {target.control}: start one there with "
                                 f"`sdlive serve --control {target.control}` (or leave out --daemon to have this "
                                 f"command start one)")
        if not is_loopback_address(target.control) or not target.control.startswith("tcp://"):
            raise AutoStartError(f"no sdlive daemon answered at {target.control} (from {target.control_from}): start "
                                 f"`sdlive serve` on that machine, or point SDLIVE_CONTROL / config.toml elsewhere")
    why = "given with --model"
    if model is None:
        model, why = pick_model(device)
    on_configured = not start_here and port_free(target.control) and port_free(target.pub)
    local = LocalDaemon(model=model, device=device, token=target.token,
                        control=target.control if on_configured else None, pub=target.pub if on_configured else None)
    moved = "" if on_configured or start_here else f" ({target.control} is taken by something that is not a daemon)"
    with err_console.status(f"starting a local sdlive daemon for {purpose} with model {model} at "
                            f"{local.control}{moved} …") as spinner:
        local.on_loading = lambda hello: spinner.update(loading_line(local.control, hello))
        address = local.start()
    found = _answering(address, target.token)
    err_console.print(f"[dim]local daemon at {address}: model {found[0] if found else model} on "
                      f"{found[1] if found else '?'} ({why}); log: {local.log_path}[/]")
    try:
        yield DaemonInUse(address, found[0] if found else model, found[1] if found else "?", started=local)
    finally:
        others = _other_sessions(address, target.token) if local.running else 0
        if others:
            local.release()
            err_console.print(f"the local daemon at {address} keeps running: {others} session(s) of other clients "
                              f"use it (`sdlive shutdown --address {address}` stops it)")
        else:
            local.stop()
