"""Driving OBS from outside through obs-websocket v5 (obsws-python), and running a headless OBS under Xvfb.

Used by ``sdlive obs setup|preset|status``, the OBS tests (tests/obs) and ``bench/obs_filter.py``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import obs_setup

log = logging.getLogger(__name__)

FILTER_KIND = "sdlive_filter"  # the id the OBS script registers
DEFAULT_FILTER_NAME = "sdlive"
HOTKEY_PREFIX = "sdlive.preset."
MIN_OBS_VERSION = (29, 0)
MIN_WEBSOCKET_VERSION = (5, 0)
MIN_UPTIME_S = 2.0  # see HeadlessOBS.stop

# settings keys of the filter (the same names as KEY_* in obs_script.py)
SETTING_ADDRESS = "daemon_address"
SETTING_PRESET = "preset"
SETTING_STEPS = "steps"
SETTING_STRENGTH = "strength"
SETTING_WHEN_AWAY = "when_away"


class ObsUnavailable(RuntimeError):
    """OBS's websocket did not answer: names the address and the fix."""


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def connect(host: str = "localhost", port: int = obs_setup.DEFAULT_WS_PORT, password: str = "", timeout: float = 3.0):
    """An obsws-python ``ReqClient``; raises ObsUnavailable naming the fix when OBS does not answer."""
    import obsws_python as obsws

    # obsws-python logs every failed request at ERROR level; its exceptions carry the same text.
    logging.getLogger("obsws_python").setLevel(logging.CRITICAL)
    try:
        return obsws.ReqClient(host=host, port=port, password=password or None, timeout=timeout)
    except (ConnectionRefusedError, OSError, TimeoutError) as exc:
        raise ObsUnavailable(
            f"OBS websocket at ws://{host}:{port} did not answer ({exc}). Start OBS and enable Tools → WebSocket "
            f"Server Settings → Enable WebSocket server (or run `python installer/install_obs.py --websocket` while "
            f"OBS is closed)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - obsws raises plain Exception subclasses for auth failures
        raise ObsUnavailable(f"OBS websocket at ws://{host}:{port} refused the connection: {exc} (check --password)") from None


def check_versions(client) -> dict:
    """OBS and obs-websocket versions, and whether they are new enough."""
    v = client.get_version()
    obs_v = _version_tuple(v.obs_version)
    ws_v = _version_tuple(v.obs_web_socket_version)
    problems = []
    if obs_v[:2] < MIN_OBS_VERSION:
        problems.append(f"OBS {v.obs_version} is older than {'.'.join(map(str, MIN_OBS_VERSION))}: update OBS")
    if ws_v[:2] < MIN_WEBSOCKET_VERSION:
        problems.append(f"obs-websocket {v.obs_web_socket_version} is older than 5.0: update OBS (28+ bundles it)")
    return {
        "obs_version": v.obs_version,
        "websocket_version": v.obs_web_socket_version,
        "platform": getattr(v, "platform", ""),
        "problems": problems,
    }


def hotkey_names(client) -> list[str]:
    return list(client.get_hotkey_list().hotkeys)


def script_loaded(client) -> bool:
    """The sdlive script registers its preset hotkeys when it loads: their presence proves it runs."""
    return any(n.startswith(HOTKEY_PREFIX) for n in hotkey_names(client))


def input_names(client) -> list[str]:
    return [i["inputName"] for i in client.get_input_list().inputs]


def sdlive_filters(client) -> list[dict]:
    """Every sdlive filter on every input: [{source, filter, enabled, settings}]."""
    found = []
    for source in input_names(client):
        try:
            filters = client.get_source_filter_list(source).filters
        except Exception:  # noqa: BLE001 - a source that vanished meanwhile
            continue
        for f in filters:
            if f.get("filterKind") == FILTER_KIND:
                found.append(
                    {
                        "source": source,
                        "filter": f["filterName"],
                        "enabled": f.get("filterEnabled", True),
                        "settings": f.get("filterSettings", {}),
                    }
                )
    return found


def add_filter(client, source: str, *, name: str = DEFAULT_FILTER_NAME, settings: dict | None = None) -> str:
    """Add (or update) the sdlive filter on ``source``. Returns what was done."""
    if source not in input_names(client):
        raise ValueError(f"OBS has no source named {source!r}; sources: {', '.join(input_names(client)) or '(none)'}")
    existing = [f["filterName"] for f in client.get_source_filter_list(source).filters]
    if name in existing:
        if settings:
            client.set_source_filter_settings(source, name, settings, True)
            return f"updated filter {name!r} on {source!r}"
        return f"filter {name!r} already on {source!r}"
    client.create_source_filter(source, name, FILTER_KIND, settings or {})
    return f"added filter {name!r} to {source!r}"


def trigger_preset(client, name: str) -> str:
    """Press the script's hotkey for a preset name, or ``next`` / ``prev``."""
    hotkey = HOTKEY_PREFIX + name
    names = hotkey_names(client)
    if hotkey not in names:
        known = sorted(n[len(HOTKEY_PREFIX) :] for n in names if n.startswith(HOTKEY_PREFIX))
        if not known:
            raise ValueError("the sdlive script is not loaded in OBS (no sdlive hotkeys): run `sdlive obs setup`")
        raise ValueError(f"no hotkey for preset {name!r}; OBS knows: {', '.join(known)}")
    client.trigger_hotkey_by_name(hotkey)
    return hotkey


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


def missing_tools() -> list[str]:
    return [t for t in ("obs", "Xvfb") if shutil.which(t) is None]


@dataclass
class HeadlessOBS:
    """A real OBS under Xvfb with its own config directory. ``start()`` waits for the websocket; ``stop()`` sends
    SIGINT (a clean shutdown: scene collection saved, leak report logged) and kills Xvfb."""

    home: Path
    width: int = 320
    height: int = 180
    fps: int = 30
    scripts: list[Path] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    minimize: bool = True
    screen: str = "1280x720x24"
    ws_port: int = 0
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

    def write_config(self) -> Path:
        self.ws_port = self.ws_port or free_port()
        return obs_setup.write_fresh_config(
            self.config_dir, width=self.width, height=self.height, fps=self.fps, ws_port=self.ws_port,
            scripts=self.scripts,
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
        env = dict(os.environ)
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
        return connect("127.0.0.1", self.ws_port, "", timeout=timeout)

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

    def stop(self, timeout: float = 30.0) -> int | None:
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            # OBS 29 crashes (SIGSEGV) or hangs about half the time when SIGINT arrives within its first second
            # (reproduced with no script loaded at all): give it MIN_UPTIME_S before asking it to quit.
            wait = MIN_UPTIME_S - (time.monotonic() - self.ready_at)
            if wait > 0:
                time.sleep(wait)
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

    def __enter__(self) -> HeadlessOBS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
