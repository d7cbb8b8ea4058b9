"""The test harness for real OBS: a headless OBS under Xvfb with its own config directory, a restartable daemon,
screenshots. Used by tests/obs and bench/obs_filter.py (which loads this file by path); never by users' commands.

Only absolute imports here, so the file works both as ``tests/obs`` pytest module and loaded by path.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from sdlive.daemon.protocol.secret import secure_client
from sdlive.obs_bridge import obs_setup, obsws_tools

REPO = Path(__file__).resolve().parents[2]
SCRIPT_NAMES = obs_setup.SCRIPT_NAMES  # obs_script/sdlive_names.py: the filter's id, settings keys, env switches
SCRIPT_DIR = obs_setup.SCRIPT_SOURCE_DIR
SCRIPT = SCRIPT_DIR / SCRIPT_NAMES.ENTRY_FILE  # the entry file OBS loads
MIN_UPTIME_S = 2.0  # see HeadlessOBS.stop


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, *, interval_s: float = 0.2,
               context: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout_s`` passes: TimeoutError naming
    ``what``, plus ``context()`` (state worth seeing when it failed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}" + (context() if context else ""))


def missing_tools() -> list[str]:
    return [t for t in ("obs", "Xvfb") if shutil.which(t) is None]


def screenshot(client, source: str, width: int, height: int):
    """``GetSourceScreenshot`` as an HxWx3 uint8 RGB numpy array."""
    import cv2
    import numpy as np

    resp = client.get_source_screenshot(source, "png", width, height, -1)
    data = resp.image_data
    raw = base64.b64decode(data.split(",", 1)[1] if "," in data else data)
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise RuntimeError(f"OBS returned an undecodable screenshot of {source!r}")
    return img[:, :, ::-1].copy()


# ------------------------------------------------------------------------------------------------ headless OBS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_display() -> int:
    for n in range(90, 400):
        if not os.path.exists(f"/tmp/.X11-unix/X{n}") and not os.path.exists(f"/tmp/.X{n}-lock"):
            return n
    raise RuntimeError("no free X display number in :90..:399")


# ------------------------------------------------------------------------------------------- OBS environment

# Kept from the tests' environment although they start with PYTHON: they change no path OBS's Python reads.
PYTHON_VARS_KEPT = frozenset({"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PYTHONFAULTHANDLER"})
OTHER_PYTHON_VARS = frozenset({"VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "CONDA_PYTHON_EXE"})
SYSTEM_BIN_DIRS = ("/usr/bin", "/bin")  # where the distribution's python3 lives, beside OBS's libpython


def _holds_python(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, n)) for n in ("python3", "python"))


def obs_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a headless OBS runs with: ``base`` (the tests' own) without what would point OBS's embedded
    Python at another interpreter.

    OBS 29 on Linux initializes the system libpython (Debian: 3.11.2) without setting its home, so CPython takes
    ``sys.prefix`` from the first ``python3`` on PATH: under pyenv (``pyenv exec`` puts the version's bin folder
    first), a virtualenv or conda it loaded that interpreter's standard library into Debian's libpython (measured:
    ``sys.prefix`` was ``~/.pyenv/versions/3.11.7``). So: no PYTHONHOME/PYTHONPATH/... and no PATH entry holding a
    python3 other than the system's; OBS then uses ``/usr/lib/python3.X``, as when a user starts it."""
    base = dict(os.environ if base is None else base)
    env = {k: v for k, v in base.items()
           if not ((k.startswith("PYTHON") and k not in PYTHON_VARS_KEPT) or "PYENV" in k
                   or k in OTHER_PYTHON_VARS)}
    path = [d for d in base.get("PATH", "").split(os.pathsep)
            if d and (os.path.normpath(d) in SYSTEM_BIN_DIRS or not _holds_python(d))]
    path += [d for d in SYSTEM_BIN_DIRS if d not in path]
    env["PATH"] = os.pathsep.join(path)
    return env


# ------------------------------------------------------------------------------------------------ OBS config


def write_fresh_config(
    config_dir: Path,
    *,
    width: int = 320,
    height: int = 180,
    fps: int = 30,
    ws_port: int = obs_setup.DEFAULT_WS_PORT,
    ws_password: str = "",
    scripts: list[Path] | tuple[Path, ...] = (),
    script_settings: dict | None = None,
    name: str = "sdlive",
) -> Path:
    """A complete OBS config (no first-run wizard, websocket on, one empty scene "Main", the given scripts loaded
    at start) for a headless OBS. Returns the scene collection file."""
    config_dir.mkdir(parents=True, exist_ok=True)
    cp = obs_setup.IniFile()
    cp["General"] = {
        "FirstRun": "true",
        "LastVersion": str((29 << 24) | (0 << 16) | 2),
        "InfoIncrement": "999",
        "ConfirmOnExit": "false",
        "EnableAutoUpdates": "false",
    }
    cp["Basic"] = {"Profile": name, "ProfileDir": name, "SceneCollection": name, "SceneCollectionFile": name}
    obs_setup.write_ini(config_dir / "global.ini", cp)
    obs_setup.write_websocket_settings(config_dir, enabled=True, port=ws_port, auth=bool(ws_password),
                                       password=ws_password)
    profile = obs_setup.IniFile()
    profile["General"] = {"Name": name}
    profile["Video"] = {
        "BaseCX": str(width),
        "BaseCY": str(height),
        "OutputCX": str(width),
        "OutputCY": str(height),
        "FPSType": "0",
        "FPSCommon": str(fps),
    }
    profile["Output"] = {"Mode": "Simple"}
    obs_setup.write_ini(config_dir / "basic" / "profiles" / name / "basic.ini", profile)
    collection = config_dir / "basic" / "scenes" / f"{name}.json"
    collection.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "current_scene": "Main",
        "current_program_scene": "Main",
        "scene_order": [{"name": "Main"}],
        "sources": [{"id": "scene", "versioned_id": "scene", "name": "Main", "settings": {"items": [], "id_counter": 0}}],
        "modules": {
            "scripts-tool": [{"path": str(p), "settings": dict(script_settings or {})} for p in scripts],
        },
    }
    collection.write_text(json.dumps(doc, indent=4), encoding="utf-8")
    return collection


# ------------------------------------------------------------------------------------------------ quitting OBS

# OBS 29.0.2 (Debian) runs its whole shutdown inside its SIGINT handler, on top of whatever the main thread was doing
# (gdb: QWidgetPrivate::close_helper right above "<signal handler called>"). With a media source, whose audio-mixer
# meter repaints all the time, that now and then deadlocks in libxcb (the interrupted code held its lock: a hang after
# "==== Shutting down") or leaves a freed widget in Qt's repaint list (SIGSEGV after "All scene data cleared"), with
# no script loaded at all. A user closes the window instead: the harness does the same, from this helper script, which
# closes OBS's main window from OBS's UI task queue (QWidget::close, as the window's close button) when the trigger
# file appears. SIGINT stays the fallback where the helper is not loaded.
QUIT_SCRIPT_NAME = "harness_quit_obs.py"
QUIT_TRIGGER_NAME = "harness-quit-obs"
QUIT_SCRIPT = f"""
import ctypes, os
import obspython as obs
TRIGGER = os.path.join(os.environ["HOME"], {QUIT_TRIGGER_NAME!r})
def _lib(*names):
    with open("/proc/self/maps") as maps:
        path = next(line.split()[-1] for line in maps if any(n in line.rsplit("/", 1)[-1] for n in names))
    return ctypes.CDLL(path)
libobs, frontend = _lib("libobs.so"), _lib("libobs-frontend-api.so")
widgets = _lib("libQt5Widgets.so", "libQt6Widgets.so")
TASK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
close_window = TASK(ctypes.cast(widgets._ZN7QWidget5closeEv, ctypes.c_void_p).value)  # QWidget::close()
frontend.obs_frontend_get_main_window.restype = ctypes.c_void_p
libobs.obs_queue_task.argtypes = [ctypes.c_int, TASK, ctypes.c_void_p, ctypes.c_bool]
def poll():
    if os.path.exists(TRIGGER):
        os.unlink(TRIGGER)
        obs.timer_remove(poll)
        obs.script_log(obs.LOG_INFO, "closing the main window")
        libobs.obs_queue_task(0, close_window, frontend.obs_frontend_get_main_window(), False)  # OBS_TASK_UI
def script_load(settings):
    obs.timer_add(poll, 100)
"""


@dataclass
class HeadlessOBS:
    """A real OBS under Xvfb with its own config directory. ``start()`` waits for the websocket; ``stop()`` closes
    OBS's main window (a clean shutdown, as a user's: scene collection saved, leak report logged; SIGINT where the
    harness's quit helper is not loaded, see ``QUIT_SCRIPT``) and kills Xvfb."""

    home: Path
    width: int = 320
    height: int = 180
    fps: int = 30
    scripts: list[Path] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    minimize: bool = True
    screen: str = "1280x720x24"
    ws_port: int = 0
    ws_password: str = ""  # what the config's websocket wants (write_config writes none)
    display: int = 0
    proc: subprocess.Popen | None = None
    xvfb: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_at: float = 0.0

    @property
    def config_dir(self) -> Path:
        return self.home / ".config" / "obs-studio"

    @property
    def log_dir(self) -> Path:
        return self.config_dir / "logs"

    @property
    def quit_trigger(self) -> Path:
        return self.home / QUIT_TRIGGER_NAME

    def write_config(self) -> Path:
        """A fresh config loading ``scripts`` and, last, the harness's quit helper."""
        self.ws_port = self.ws_port or free_port()
        helper = self.home / QUIT_SCRIPT_NAME
        helper.parent.mkdir(parents=True, exist_ok=True)
        helper.write_text(QUIT_SCRIPT, encoding="utf-8")
        return write_fresh_config(
            self.config_dir, width=self.width, height=self.height, fps=self.fps, ws_port=self.ws_port,
            scripts=[*self.scripts, helper],
        )

    def start(self, timeout: float = 60.0) -> HeadlessOBS:
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"cannot run OBS headless: {', '.join(missing)} not installed "
                               "(Debian: apt-get install obs-studio xvfb xauth)")
        if not (self.config_dir / "global.ini").exists():
            self.write_config()
        self.display = self.display or _free_display()
        self.xvfb = subprocess.Popen(
            ["Xvfb", f":{self.display}", "-screen", "0", self.screen, "-nolisten", "tcp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(f"/tmp/.X11-unix/X{self.display}"):
            if self.xvfb.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Xvfb :{self.display} did not start")
            time.sleep(0.05)
        env = obs_environment()  # the tests' environment, less what would misplace OBS's Python
        env.update(
            HOME=str(self.home), XDG_CONFIG_HOME=str(self.home / ".config"), DISPLAY=f":{self.display}",
            LIBGL_ALWAYS_SOFTWARE="1", QT_QPA_PLATFORM="xcb",
        )
        env.update(self.env)
        args = ["obs", "--multi", "--disable-missing-files-check"]
        if self.minimize:
            args.insert(1, "--minimize-to-tray")
        self.stdout_path = self.home / "obs-stdout.txt"
        self.started_at = time.monotonic()
        with open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(self.home))
        self.wait_ready(timeout)
        return self

    def client(self, timeout: float = 5.0):
        return obsws_tools.connect("127.0.0.1", self.ws_port, self.ws_password, timeout=timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"OBS exited with {self.proc.returncode} before its websocket came up:\n"
                                   + self.log_text()[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", self.ws_port), timeout=0.5):
                    pass
                cl = self.client(timeout=5)
                cl.get_version()
                with contextlib.suppress(Exception):
                    cl.disconnect()
                self.ready_at = time.monotonic()
                return
            except Exception as exc:  # noqa: BLE001
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"OBS websocket on port {self.ws_port} not ready after {timeout:.0f} s ({last})")

    def log_text(self) -> str:
        """OBS's own log (all of this run's files) plus its stdout."""
        parts = []
        if self.log_dir.is_dir():
            for p in sorted(self.log_dir.glob("*.txt")):
                parts.append(p.read_text(errors="replace"))
        if getattr(self, "stdout_path", None) and self.stdout_path.exists():
            parts.append(self.stdout_path.read_text(errors="replace"))
        return "\n".join(parts)

    def stop(self, timeout: float = 30.0, *, sigint: bool = False) -> int | None:
        """Quit OBS: close its main window (``sigint``: send SIGINT, as Ctrl-C in a terminal); kill it after
        ``timeout``. Returns its exit status."""
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            # Not in OBS's first seconds: OBS 29 crashed (SIGSEGV) or hung about half the time when SIGINT came within
            # its first second (with no script loaded at all).
            wait = MIN_UPTIME_S - (time.monotonic() - self.ready_at)
            if wait > 0:
                time.sleep(wait)
            if sigint or not self._close_window():
                self.proc.send_signal(signal.SIGINT)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(5)
        elif self.proc is not None:
            rc = self.proc.returncode
        if self.xvfb is not None and self.xvfb.poll() is None:
            self.xvfb.terminate()
            try:
                self.xvfb.wait(5)
            except subprocess.TimeoutExpired:
                self.xvfb.kill()
        return rc

    def _close_window(self, take_s: float = 3.0) -> bool:
        """Ask the quit helper to close OBS's main window; False where it did not take the request within
        ``take_s`` (not loaded: a config written without it, or a scene collection without it)."""
        if f"Loaded python script: {QUIT_SCRIPT_NAME}" not in self.log_text():
            return False
        trigger = self.quit_trigger
        trigger.touch()
        deadline = time.monotonic() + take_s
        while time.monotonic() < deadline:
            if not trigger.exists() or self.proc.poll() is not None:
                return True
            time.sleep(0.05)
        try:
            trigger.unlink()
        except FileNotFoundError:
            return True  # taken just now
        return False

    def __enter__(self) -> HeadlessOBS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------- daemon


class RestartableDaemon:
    """A real `sdlive serve --model tiny --device cpu` started with the suite's ``start_daemon`` (tests/conftest.py)
    on fixed loopback ports, so a test can SIGKILL it and start it again at the same address (the shared ``daemon``
    fixture cannot be restarted in place)."""

    def __init__(self, launch, workdir: Path):
        self.launch = launch
        self.workdir = workdir
        self.control_address = f"tcp://127.0.0.1:{free_port()}"
        self.pub_address = f"tcp://127.0.0.1:{free_port()}"
        self.proc = None
        self.starts = 0
        self._ctx = zmq.Context.instance()

    @property
    def process(self):
        return self.proc.process if self.proc is not None else None

    def start(self) -> None:
        self.starts += 1
        self.proc = self.launch(self.workdir / f"run{self.starts}", control=self.control_address,
                                pub=self.pub_address)

    def request(self, op: str, timeout: float = 30.0, **fields) -> dict:
        """One control request over a fresh DEALER (generous timeout: the compute loop answers between steps)."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        secure_client(sock)  # local auth is on by default: this session's secret (tests/conftest.py)
        sock.connect(self.control_address)
        try:
            sock.send(json.dumps({"op": op, **fields}).encode())
            if not sock.poll(int(timeout * 1000)):
                raise TimeoutError(f"no reply to {op} from {self.control_address}")
            return json.loads(sock.recv())
        finally:
            sock.close(0)

    def sessions(self) -> list[dict]:
        return self.request("status").get("sessions", [])

    def kill(self) -> None:
        """SIGKILL: the daemon vanishes without closing anything (the worst case for the filter)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
