"""sdlive OBS script: the "sdlive" video filter (Tools → Scripts → + → this file).

Runs inside OBS's own Python (Debian: the system python3; Windows: the CPython set in Tools → Scripts → Python
Settings), so the frame path is **stdlib only** (ctypes, mmap, struct, threading, socket). pyzmq is used for the
control channel when importable; otherwise a minimal ZMTP 3.0 DEALER written on the stdlib ``socket`` module speaks
to the daemon's ROUTER, so a missing pyzmq degrades nothing. Frames go through the daemon's shared-memory rings
(``daemon/protocol/ring.py``, loaded by file path: next to this script as ``sdlive_ring.py`` when the installer
copied it, else from the source tree).

``obspython`` has no ``obs_register_source``: the filter is registered by filling the leading fields of libobs'
``struct obs_source_info`` and calling ``obs_register_source_s`` through ctypes (DESIGN §5, research/obs.md).

Threads:
- OBS's graphics thread calls ``video_render`` (once per view per frame). It never waits: the instance lock is
  try-acquired, and on any miss or failure the source passes through (``obs_source_skip_video_filter``).
  Frames are captured at most once per output frame (``obs_get_video_frame_time``), staged on two stage surfaces
  (the previous frame's surface is mapped: no GPU stall) and copied into the input ring (one memcpy).
- One worker thread per filter instance owns the daemon connection: hello → open_session at the filter's size and
  OBS's fps → heartbeats every second (Paranoid Pirate, liveness 3) → reconnect with capped doubling backoff.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import importlib.util
import itertools
import json
import os
import queue
import re
import socket
import struct
import sys
import threading
import time
import types
from urllib.parse import urlparse

import obspython as obs

ZMQ_IMPORT_ERROR = ""
try:  # optional: the installer puts pyzmq into OBS's Python where it can
    zmq = importlib.import_module("zmq")
except Exception as _exc:  # noqa: BLE001 - any import failure (missing, ABI mismatch) means "use the stdlib client"
    zmq = None
    ZMQ_IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
for _extra in (os.path.join(SCRIPT_DIR, "sdlive_site"),):  # the installer's private site dir (pip --target)
    if os.path.isdir(_extra) and _extra not in sys.path and zmq is None:
        sys.path.insert(0, _extra)
        try:
            zmq = importlib.import_module("zmq")
        except Exception as _exc:  # noqa: BLE001
            zmq = None
            ZMQ_IMPORT_ERROR += f"; {_extra}: {type(_exc).__name__}: {_exc}"

# ---------------------------------------------------------------------------------------------------------------
# Names and constants
# ---------------------------------------------------------------------------------------------------------------
FILTER_ID = b"sdlive_filter"
FILTER_NAME = b"sdlive"
PROTOCOL = "sdlive/1"
PIXEL_FORMAT = "bgra"  # matches the GS_BGRA texrender / stage surfaces / output texture below
BYTES_PER_PIXEL = 4
SIZE_MULTIPLE = 16  # the daemon takes widths and heights that are multiples of 16

# settings keys (named constants: DESIGN §5 / STYLE)
KEY_ADDRESS = "daemon_address"
KEY_TOKEN = "token"
KEY_PRESET = "preset"
KEY_STEPS = "steps"
KEY_STRENGTH = "strength"
KEY_WHEN_AWAY = "when_away"
KEY_HOTKEYS = "sdlive_hotkeys"  # script settings: saved hotkey bindings, per hotkey name
KEY_KNOWN_PRESETS = "sdlive_known_presets"  # script settings: preset names last seen from the daemon

DEFAULT_ADDRESS = "tcp://127.0.0.1:5557"
DEFAULT_STEPS = 2
DEFAULT_STRENGTH = 0.8
MIN_STRENGTH = 0.01  # noise_scale must be > 0
AWAY_PASSTHROUGH = "passthrough"
AWAY_LAST_OUTPUT = "last_output"

HOTKEY_PREFIX = "sdlive.preset."
HOTKEY_NEXT = HOTKEY_PREFIX + "next"
HOTKEY_PREV = HOTKEY_PREFIX + "prev"

# Paranoid Pirate liveness (ZeroMQ Guide ppworker): any reply counts as life
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3
RECONNECT_INITIAL_S = 0.25
RECONNECT_MAX_S = 2.0
REQUEST_TIMEOUT_S = 1.0
OPEN_TIMEOUT_S = 15.0  # open_session: the daemon allocates the model session
COMMAND_TIMEOUT_S = 5.0  # set_preset / set_params: answered by the daemon's compute loop, which may be mid-chunk

ENV_STATS = "SDLIVE_OBS_STATS"  # path of a JSON file the script rewrites once a second (bench, tests)
ENV_CONTROL = "SDLIVE_OBS_CONTROL"  # "pyzmq" | "stdlib": force one control client (tests); default: pyzmq if present
ENV_INBAND = "SDLIVE_OBS_INBAND"  # "1": preset/params changes go through the ring's control block only
ENV_RING = "SDLIVE_RING_PY"  # path of ring.py, overrides the search below
TIMING_WINDOW = 600  # render-thread samples kept for p50/p99

# ---------------------------------------------------------------------------------------------------------------
# Logging (libobs blog is thread safe; print() from a worker thread is not guaranteed to be)
# ---------------------------------------------------------------------------------------------------------------


def _find_libobs() -> ctypes.CDLL:
    names = []
    if sys.platform == "win32":
        names = ["obs.dll", "obs"]
    elif sys.platform == "darwin":
        names = ["libobs.framework/libobs", "libobs.dylib"]
    found = ctypes.util.find_library("obs")
    if found:
        names.insert(0, found)
    names += ["libobs.so.0", "libobs.so.29", "libobs.so.30", "libobs.so"]
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    raise OSError("sdlive: could not load libobs; tried " + "; ".join(errors))


lib = _find_libobs()
lib.blog.restype = None


def log(level: int, msg: str) -> None:
    lib.blog(ctypes.c_int(level), b"[sdlive] %s", msg.encode("utf-8", "replace"))


def info(msg: str) -> None:
    log(obs.LOG_INFO, msg)


def warn(msg: str) -> None:
    log(obs.LOG_WARNING, msg)


# ---------------------------------------------------------------------------------------------------------------
# libobs through ctypes: signatures
# ---------------------------------------------------------------------------------------------------------------
VP = ctypes.c_void_p
U32 = ctypes.c_uint32
CP = ctypes.c_char_p


class Vec4(ctypes.Structure):
    _fields_ = [("x", ctypes.c_float), ("y", ctypes.c_float), ("z", ctypes.c_float), ("w", ctypes.c_float)]


def _sig(name: str, restype, *argtypes) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_sig("obs_register_source_s", None, VP, ctypes.c_size_t)
_sig("obs_filter_get_target", VP, VP)
_sig("obs_filter_get_parent", VP, VP)
_sig("obs_source_get_base_width", U32, VP)
_sig("obs_source_get_base_height", U32, VP)
_sig("obs_source_get_name", CP, VP)
_sig("obs_source_skip_video_filter", None, VP)
_sig("obs_source_video_render", None, VP)
_sig("obs_source_draw", None, VP, ctypes.c_int, ctypes.c_int, U32, U32, ctypes.c_bool)
_sig("obs_source_get_settings", VP, VP)
_sig("obs_get_base_effect", VP, ctypes.c_int)
_sig("obs_get_video_frame_time", ctypes.c_uint64)
_sig("obs_enter_graphics", None)
_sig("obs_leave_graphics", None)
_sig("gs_effect_loop", ctypes.c_bool, VP, CP)
_sig("gs_texrender_create", VP, ctypes.c_int, ctypes.c_int)
_sig("gs_texrender_destroy", None, VP)
_sig("gs_texrender_reset", None, VP)
_sig("gs_texrender_begin", ctypes.c_bool, VP, U32, U32)
_sig("gs_texrender_end", None, VP)
_sig("gs_texrender_get_texture", VP, VP)
_sig("gs_stagesurface_create", VP, U32, U32, ctypes.c_int)
_sig("gs_stagesurface_destroy", None, VP)
_sig("gs_stage_texture", None, VP, VP)
_sig("gs_stagesurface_map", ctypes.c_bool, VP, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(U32))
_sig("gs_stagesurface_unmap", None, VP)
_sig("gs_texture_create", VP, U32, U32, ctypes.c_int, U32, VP, U32)
_sig("gs_texture_destroy", None, VP)
_sig("gs_texture_set_image", None, VP, VP, U32, ctypes.c_bool)
_sig("gs_clear", None, U32, ctypes.POINTER(Vec4), ctypes.c_float, ctypes.c_uint8)
_sig("gs_ortho", None, *([ctypes.c_float] * 6))
_sig("gs_blend_state_push", None)
_sig("gs_blend_state_pop", None)
_sig("gs_blend_function", None, ctypes.c_int, ctypes.c_int)
_sig("obs_data_get_string", CP, VP, CP)
_sig("obs_data_get_int", ctypes.c_longlong, VP, CP)
_sig("obs_data_get_double", ctypes.c_double, VP, CP)
_sig("obs_data_set_string", None, VP, CP, CP)
_sig("obs_data_set_default_string", None, VP, CP, CP)
_sig("obs_data_set_default_int", None, VP, CP, ctypes.c_longlong)
_sig("obs_data_set_default_double", None, VP, CP, ctypes.c_double)
_sig("obs_data_release", None, VP)
_sig("obs_properties_create", VP)
_sig("obs_properties_add_text", VP, VP, CP, CP, ctypes.c_int)
_sig("obs_properties_add_list", VP, VP, CP, CP, ctypes.c_int, ctypes.c_int)
_sig("obs_property_list_add_string", ctypes.c_size_t, VP, CP, CP)
_sig("obs_properties_add_int_slider", VP, VP, CP, CP, ctypes.c_int, ctypes.c_int, ctypes.c_int)
_sig("obs_properties_add_float_slider", VP, VP, CP, CP, ctypes.c_double, ctypes.c_double, ctypes.c_double)
_sig("obs_property_set_long_description", None, VP, CP)

GET_NAME = ctypes.CFUNCTYPE(VP, VP)  # returns const char*: a pointer into a buffer we keep alive
CREATE = ctypes.CFUNCTYPE(VP, VP, VP)
DESTROY = ctypes.CFUNCTYPE(None, VP)
GET_DEFAULTS = ctypes.CFUNCTYPE(None, VP)
GET_PROPERTIES = ctypes.CFUNCTYPE(VP, VP)
UPDATE = ctypes.CFUNCTYPE(None, VP, VP)
VIDEO_RENDER = ctypes.CFUNCTYPE(None, VP, VP)


class SourceInfo(ctypes.Structure):
    """The leading fields of libobs' ``struct obs_source_info`` (stable since OBS 26); ``obs_register_source_s``
    copies only ``size`` bytes, so the fields after ``video_render`` stay zero (unused)."""

    _fields_ = [
        ("id", CP),
        ("type", ctypes.c_int),
        ("output_flags", U32),
        ("get_name", GET_NAME),
        ("create", CREATE),
        ("destroy", DESTROY),
        ("get_width", VP),
        ("get_height", VP),
        ("get_defaults", GET_DEFAULTS),
        ("get_properties", GET_PROPERTIES),
        ("update", UPDATE),
        ("activate", VP),
        ("deactivate", VP),
        ("show", VP),
        ("hide", VP),
        ("video_tick", VP),
        ("video_render", VIDEO_RENDER),
    ]


# ---------------------------------------------------------------------------------------------------------------
# The ring module (stdlib only), loaded by path
# ---------------------------------------------------------------------------------------------------------------


def ring_candidates() -> list[str]:
    paths = []
    if os.environ.get(ENV_RING):
        paths.append(os.environ[ENV_RING])
    paths.append(os.path.join(SCRIPT_DIR, "sdlive_ring.py"))
    paths.append(os.path.join(SCRIPT_DIR, os.pardir, "daemon", "protocol", "ring.py"))
    return [os.path.normpath(p) for p in paths]


def load_ring_module() -> types.ModuleType:
    tried = []
    for path in ring_candidates():
        if not os.path.isfile(path):
            tried.append(f"{path} (missing)")
            continue
        name = "_sdlive_ring"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their module through sys.modules
        spec.loader.exec_module(module)
        return module
    raise ImportError(
        "sdlive: the frame ring module was not found; tried " + ", ".join(tried) + ". Re-run `sdlive obs install` "
        "(it copies ring.py next to this script as sdlive_ring.py) or set SDLIVE_RING_PY."
    )


# ---------------------------------------------------------------------------------------------------------------
# Control clients: pyzmq DEALER, or a stdlib ZMTP 3.0 DEALER (NULL mechanism)
# ---------------------------------------------------------------------------------------------------------------


class ControlError(Exception):
    """The daemon did not answer (timeout, refused) — distinct from an error reply."""


class DaemonReplyError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class _ControlBase:
    def __init__(self, address: str, token: str | None):
        self.address = address
        self.token = token or None
        self._ids = itertools.count(1)

    def request(self, op: str, timeout_s: float = REQUEST_TIMEOUT_S, **fields) -> dict:
        msg_id = next(self._ids)
        msg = {"op": op, "id": msg_id, **fields}
        if self.token:
            msg["token"] = self.token
        data = json.dumps(msg).encode("utf-8")
        deadline = time.monotonic() + timeout_s
        self._send(data)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._reset()
                raise ControlError(f"no reply to {op!r} from {self.address} within {timeout_s:.1f} s")
            raw = self._recv(left)
            if raw is None:
                continue
            try:
                reply = json.loads(raw.decode("utf-8"))
            except ValueError:
                continue
            if reply.get("id") not in (msg_id, None):
                continue  # a late reply to an earlier request that timed out
            if not reply.get("ok", False):
                err = reply.get("error") or {}
                raise DaemonReplyError(str(err.get("code", "internal")), str(err.get("message", "")))
            return reply


class PyzmqControl(_ControlBase):
    kind = "pyzmq"

    def __init__(self, address: str, token: str | None):
        super().__init__(address, token)
        self._ctx = zmq.Context.instance()
        self._sock = None
        self._reset()

    def _reset(self) -> None:  # Paranoid Pirate: a fresh socket, LINGER 0
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)

    def _send(self, data: bytes) -> None:
        self._sock.send(data)

    def _recv(self, timeout_s: float):
        if self._sock.poll(int(timeout_s * 1000) + 1, zmq.POLLIN):
            frames = self._sock.recv_multipart()
            return frames[-1]
        return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class StdlibControl(_ControlBase):
    """Just enough ZMTP 3.0 to talk to a ZeroMQ ROUTER as a DEALER: greeting, NULL handshake, single-frame messages.
    Reconnects (fresh TCP connection) whenever a request times out or the connection drops."""

    kind = "stdlib"
    FLAG_MORE, FLAG_LONG, FLAG_COMMAND = 0x01, 0x02, 0x04

    def __init__(self, address: str, token: str | None):
        super().__init__(address, token)
        url = urlparse(address)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise ValueError(f"daemon address {address!r}: expected tcp://HOST:PORT (ipc/inproc need pyzmq)")
        self._host, self._port = url.hostname, url.port
        self._sock: socket.socket | None = None
        self._buf = b""

    def _reset(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._buf = b""

    def close(self) -> None:
        self._reset()

    def _connect(self, timeout_s: float) -> None:
        try:
            sock = socket.create_connection((self._host, self._port), timeout=timeout_s)
        except OSError as exc:
            raise ControlError(f"cannot connect to {self.address}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._buf = b""
        try:
            greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
            sock.sendall(greeting)
            peer = self._read_exact(64, timeout_s)
            if peer[0:1] != b"\xff" or peer[9:10] != b"\x7f" or peer[10] < 3:
                raise ControlError(f"{self.address} does not speak ZMTP 3 (greeting {peer[:12]!r})")
            mechanism = peer[12:32].rstrip(b"\x00")
            if mechanism != b"NULL":
                raise ControlError(f"{self.address} wants security mechanism {mechanism!r} (needs pyzmq)")
            ready = b"\x05READY" + self._prop(b"Socket-Type", b"DEALER") + self._prop(b"Identity", b"")
            self._send_frame(ready, command=True)
            while True:  # the peer's READY
                is_cmd, body, _more = self._read_frame(timeout_s)
                if is_cmd and body[1 : 1 + body[0]] == b"READY":
                    break
                if is_cmd and body[1 : 1 + body[0]] == b"ERROR":
                    raise ControlError(f"{self.address} refused the handshake: {body!r}")
        except (OSError, ControlError):
            self._reset()
            raise

    @staticmethod
    def _prop(name: bytes, value: bytes) -> bytes:
        return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value

    def _send_frame(self, body: bytes, *, command: bool = False, more: bool = False) -> None:
        flags = (self.FLAG_COMMAND if command else 0) | (self.FLAG_MORE if more else 0)
        if len(body) > 255:
            head = bytes([flags | self.FLAG_LONG]) + struct.pack(">Q", len(body))
        else:
            head = bytes([flags, len(body)])
        self._sock.sendall(head + body)

    def _recv_more(self, deadline: float) -> None:
        """Append what the socket has to the buffer, waiting until ``deadline`` (monotonic seconds) at most."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self._sock.settimeout(left)
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("daemon closed the connection")
        self._buf += chunk

    def _read_exact(self, n: int, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        while len(self._buf) < n:
            self._recv_more(deadline)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read_frame(self, timeout_s: float) -> tuple[bool, bytes, bool]:
        """The next complete frame (is_command, body, more). On timeout nothing is consumed: a frame that arrives
        in pieces is completed by the next call."""
        deadline = time.monotonic() + timeout_s
        while True:
            frame = self._parse_buffered_frame()
            if frame is not None:
                return frame
            self._recv_more(deadline)

    def _drain(self) -> None:
        """Before a request: take what arrived while idle (ZMTP PINGs get their PONG, late replies are dropped);
        a connection the daemon closed meanwhile (restart, heartbeat timeout) is reset, not reported."""
        import select

        try:
            while self._sock is not None and select.select([self._sock], [], [], 0)[0]:
                chunk = self._sock.recv(65536)
                if not chunk:
                    self._reset()
                    return
                self._buf += chunk
                while True:  # complete frames only; a partial one waits in _buf for the next read
                    frame = self._parse_buffered_frame()
                    if frame is None:
                        break
                    is_cmd, body, _more = frame
                    if is_cmd and body[1 : 1 + body[0]] == b"PING":
                        self._send_frame(b"\x04PONG" + body[1 + body[0] + 2 :], command=True)
        except OSError:
            self._reset()

    def _parse_buffered_frame(self) -> tuple[bool, bytes, bool] | None:
        """Take one complete frame off the receive buffer: (is_command, body, more), or None if incomplete."""
        buf = self._buf
        if len(buf) < 2:
            return None
        flags = buf[0]
        if flags & self.FLAG_LONG:
            if len(buf) < 9:
                return None
            size, head = struct.unpack(">Q", buf[1:9])[0], 9
        else:
            size, head = buf[1], 2
        if len(buf) < head + size:
            return None
        self._buf = buf[head + size :]
        return bool(flags & self.FLAG_COMMAND), buf[head : head + size], bool(flags & self.FLAG_MORE)

    def _send(self, data: bytes) -> None:
        self._drain()
        if self._sock is None:
            self._connect(REQUEST_TIMEOUT_S)
        try:
            self._send_frame(data)
        except OSError as exc:
            self._reset()
            raise ControlError(f"lost the connection to {self.address}: {exc}") from None

    def _recv(self, timeout_s: float):
        if self._sock is None:
            raise ControlError(f"not connected to {self.address}")
        deadline = time.monotonic() + timeout_s  # one deadline for the whole message, PINGs included
        try:
            parts = []
            while True:
                is_cmd, body, more = self._read_frame(max(0.0, deadline - time.monotonic()))
                if is_cmd:
                    name = body[1 : 1 + body[0]]
                    if name == b"PING":  # ZMTP 3.1 heartbeat: answer PONG with the ping's context
                        ctx = body[1 + body[0] + 2 :]
                        self._send_frame(b"\x04PONG" + ctx, command=True)
                    continue
                parts.append(body)
                if not more:
                    return parts[-1]
        except TimeoutError:
            return None
        except OSError as exc:
            self._reset()
            raise ControlError(f"lost the connection to {self.address}: {exc}") from None


def make_control(address: str, token: str | None) -> _ControlBase:
    wanted = os.environ.get(ENV_CONTROL, "").strip().lower()
    if wanted == "pyzmq" and zmq is None:
        raise ControlError("SDLIVE_OBS_CONTROL=pyzmq but pyzmq is not importable in OBS's Python")
    if zmq is not None and wanted != "stdlib":
        return PyzmqControl(address, token)
    return StdlibControl(address, token)


# ---------------------------------------------------------------------------------------------------------------
# Presets known to the script (for hotkeys and the property list)
# ---------------------------------------------------------------------------------------------------------------
_NAME_RE = re.compile(r'^\s*name\s*=\s*"([^"]+)"', re.M)
_HOTKEY_RE = re.compile(r'^\s*hotkey\s*=\s*"([^"]+)"', re.M)


def _user_preset_dir() -> str:
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Application Support")
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "sdlive", "presets")


def preset_dirs() -> list[str]:
    dirs = [os.path.join(SCRIPT_DIR, "presets"), os.path.join(SCRIPT_DIR, os.pardir, "presets"), _user_preset_dir()]
    if os.environ.get("SDLIVE_PRESETS_DIR"):
        dirs.insert(0, os.environ["SDLIVE_PRESETS_DIR"])
    return [os.path.normpath(d) for d in dirs]


def scan_preset_files() -> dict[str, str | None]:
    """name → default hotkey (e.g. "ctrl+shift+1") of every preset file found; a broken file is skipped."""
    found: dict[str, str | None] = {}
    for d in preset_dirs():
        if not os.path.isdir(d):
            continue
        for fn in sorted(os.listdir(d)):
            if not fn.endswith(".toml"):
                continue
            try:
                with open(os.path.join(d, fn), encoding="utf-8") as fh:
                    text = fh.read()
            except OSError:
                continue
            m = _NAME_RE.search(text)
            if m:
                hk = _HOTKEY_RE.search(text)
                found[m.group(1)] = hk.group(1) if hk else None
    return found


# ---------------------------------------------------------------------------------------------------------------
# Persistent process state: survives script reloads (libobs keeps our function pointers for the process lifetime)
# ---------------------------------------------------------------------------------------------------------------
_STATE_KEY = "_sdlive_obs_state"
_STATE = sys.modules.get(_STATE_KEY)
if _STATE is None:
    _STATE = types.ModuleType(_STATE_KEY)
    _STATE.registered = False
    _STATE.info = None
    _STATE.callbacks = None
    _STATE.name_buf = ctypes.create_string_buffer(FILTER_NAME)
    _STATE.instances = {}  # handle (int) → FilterInstance
    _STATE.instances_lock = threading.Lock()
    _STATE.handles = itertools.count(1)
    _STATE.impl = None  # the newest loaded script module: new instances use its FilterInstance
    _STATE.ring = None
    _STATE.preset_names = []  # the order next/prev cycle through
    _STATE.stats_thread = None
    sys.modules[_STATE_KEY] = _STATE


# ---------------------------------------------------------------------------------------------------------------
# Settings helpers (raw obs_data_t* pointers from libobs)
# ---------------------------------------------------------------------------------------------------------------


def _get_str(settings, key: str) -> str:
    raw = lib.obs_data_get_string(settings, key.encode())
    return raw.decode("utf-8", "replace") if raw else ""


def _fps() -> float:
    ovi = obs.obs_video_info()
    if obs.obs_get_video_info(ovi) and ovi.fps_den:
        return ovi.fps_num / ovi.fps_den
    return 30.0


def session_size(width: int, height: int) -> tuple[int, int]:
    """The size the daemon session runs at: the source's, rounded down to multiples of SIZE_MULTIPLE (the model
    works on 16-pixel patches of 8× downsampled latents); the filter scales to it and back."""
    return (
        max(SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE),
        max(SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE),
    )


def _percentile(values, q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# ---------------------------------------------------------------------------------------------------------------
# One filter instance
# ---------------------------------------------------------------------------------------------------------------


class Session:
    """An open daemon session: the two rings plus what the render thread needs."""

    def __init__(self, session_id: str, rin, rout, width: int, height: int, preset: str | None):
        self.session_id = session_id
        self.rin = rin
        self.rout = rout
        self.width = width
        self.height = height
        self.preset = preset
        # Base address of the output ring's mapping, so output frames upload to the GPU without a copy. Held as a
        # ctypes export of the mmap: released in close() before the ring unmaps.
        self._out_export = None
        self.out_base = None
        ring_mod = _STATE.ring
        mm = getattr(rout, "_mm", None)
        if mm is not None and hasattr(ring_mod, "HEADER_SIZE") and hasattr(ring_mod, "SLOT_HEADER_SIZE"):
            try:
                self._out_export = ctypes.c_char.from_buffer(mm)
                self.out_base = ctypes.addressof(self._out_export)
            except (TypeError, ValueError, BufferError):
                self._out_export = None

    def slot_address(self, seq: int) -> int:
        ring_mod = _STATE.ring
        return (
            self.out_base
            + ring_mod.HEADER_SIZE
            + ((seq - 1) % self.rout.slots) * self.rout.slot_size
            + ring_mod.SLOT_HEADER_SIZE
        )

    def close(self) -> None:
        self.out_base = None
        self._out_export = None  # drop the export first: the mmap cannot close while exported
        for ring in (self.rin, self.rout):
            try:
                ring.close()
            except Exception:  # noqa: BLE001
                pass


class FilterInstance:
    def __init__(self, handle: int, source: int):
        self.handle = handle
        self.source = source
        self.name = (lib.obs_source_get_name(source) or b"?").decode("utf-8", "replace")
        self.lock = threading.Lock()  # guards session + graphics objects; the render thread only try-acquires it
        self.session: Session | None = None
        # graphics objects (created on the graphics thread, destroyed inside obs_enter_graphics)
        self.gfx_size = (0, 0)
        self.texrender = None
        self.stages = [None, None]
        self.staged = [False, False]
        self.stage_idx = 0
        self.out_tex = None
        self.have_output = False
        self.pack_buf: bytearray | None = None
        self.last_frame_time = 0
        # what the worker should do (written by update()/render, read by the worker)
        self.address = DEFAULT_ADDRESS
        self.token = ""
        self.preset = ""
        self.steps = DEFAULT_STEPS
        self.strength = DEFAULT_STRENGTH
        self.when_away = AWAY_PASSTHROUGH
        self.want_size = (0, 0)
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.worker: threading.Thread | None = None
        # measurements (render thread writes, stats thread reads; deques are thread safe for append/copy)
        self.render_ns = collections.deque(maxlen=TIMING_WINDOW)
        self.e2e_ns = collections.deque(maxlen=TIMING_WINDOW)
        self.frames_in = 0
        self.frames_out = 0
        self.last_out_seq = -1
        self.skipped_busy = 0
        self.connected_at = 0.0
        self.state = "starting"
        self.control_kind = ""
        self.last_error = ""

    # -- settings ----------------------------------------------------------------------------------------------
    def update(self, settings) -> None:
        address = _get_str(settings, KEY_ADDRESS).strip() or DEFAULT_ADDRESS
        token = _get_str(settings, KEY_TOKEN).strip()
        preset = _get_str(settings, KEY_PRESET).strip()
        steps = max(1, min(4, int(lib.obs_data_get_int(settings, KEY_STEPS.encode()) or DEFAULT_STEPS)))
        strength = float(lib.obs_data_get_double(settings, KEY_STRENGTH.encode()))
        strength = max(MIN_STRENGTH, min(1.0, strength))
        when_away = _get_str(settings, KEY_WHEN_AWAY) or AWAY_PASSTHROUGH
        reconnect = (address, token) != (self.address, self.token)
        if preset and preset != self.preset:
            self.commands.put(("set_preset", preset))
        if (steps, strength) != (self.steps, self.strength):
            self.commands.put(("set_params", {"steps": steps, "noise_scale": strength}))
        self.address, self.token, self.preset = address, token, preset
        self.steps, self.strength, self.when_away = steps, strength, when_away
        if reconnect:
            self.commands.put(("reconnect", None))
        self.wake.set()
        info(
            f"filter '{self.name}': address={address} preset={preset or '(daemon default)'} steps={steps} "
            f"strength={strength:.2f} when_away={when_away} control={'pyzmq' if zmq is not None else 'stdlib'}"
        )
        if self.worker is None:
            self.worker = threading.Thread(target=self._run_worker, name=f"sdlive-{self.handle}", daemon=True)
            self.worker.start()

    def set_preset_from_hotkey(self, name: str) -> None:
        settings = lib.obs_source_get_settings(self.source)
        if settings:
            lib.obs_data_set_string(settings, KEY_PRESET.encode(), name.encode())
            lib.obs_data_release(settings)
        self.preset = name
        self.commands.put(("set_preset", name))
        self.wake.set()

    # -- graphics (graphics thread) ----------------------------------------------------------------------------
    def _ensure_gfx(self, w: int, h: int) -> None:
        if self.gfx_size == (w, h) and self.texrender:
            return
        self._destroy_gfx()
        self.texrender = lib.gs_texrender_create(obs.GS_BGRA, obs.GS_ZS_NONE)
        self.stages = [lib.gs_stagesurface_create(w, h, obs.GS_BGRA) for _ in range(2)]
        self.staged = [False, False]
        self.out_tex = lib.gs_texture_create(w, h, obs.GS_BGRA, 1, None, obs.GS_DYNAMIC)
        self.have_output = False
        self.pack_buf = None
        self.gfx_size = (w, h)

    def _destroy_gfx(self) -> None:
        if self.texrender:
            lib.gs_texrender_destroy(self.texrender)
        for s in self.stages:
            if s:
                lib.gs_stagesurface_destroy(s)
        if self.out_tex:
            lib.gs_texture_destroy(self.out_tex)
        self.texrender, self.stages, self.out_tex = None, [None, None], None
        self.staged = [False, False]
        self.gfx_size = (0, 0)
        self.have_output = False

    def render(self) -> bool:
        """Returns False to pass the source through. Never waits."""
        t0 = time.perf_counter_ns()
        target = lib.obs_filter_get_target(self.source)
        if not target:
            return False
        w = lib.obs_source_get_base_width(target)
        h = lib.obs_source_get_base_height(target)
        if not w or not h:
            return False
        sw, sh = session_size(w, h)
        self.want_size = (sw, sh)
        if not self.lock.acquire(blocking=False):
            self.skipped_busy += 1
            return False
        try:
            sess = self.session
            if sess is None or (sess.width, sess.height) != (sw, sh):
                if sess is not None:
                    self.wake.set()  # the worker reopens at the new size
                if self.when_away == AWAY_LAST_OUTPUT and self.have_output and self.gfx_size == (sw, sh):
                    self._draw(self.out_tex, w, h)
                    return True
                return False
            self._ensure_gfx(sw, sh)
            frame_time = lib.obs_get_video_frame_time()
            captured = frame_time != self.last_frame_time
            if captured:  # once per output frame, whatever the number of views
                self.last_frame_time = frame_time
                self._capture(target, w, h, sess)
                self._fetch_output(sess)
            if self.have_output:
                self._draw(self.out_tex, w, h)
            else:  # session open, first output not back yet: show the source we just rendered
                self._draw(lib.gs_texrender_get_texture(self.texrender), w, h)
            if captured:
                self.render_ns.append(time.perf_counter_ns() - t0)
            return True
        except Exception as exc:  # noqa: BLE001 - never let an exception reach libobs; pass through instead
            self.last_error = f"render: {exc!r}"
            return False
        finally:
            self.lock.release()

    def _capture(self, target, w: int, h: int, sess: Session) -> None:
        """Render the target (w×h) into the session-sized texrender (scaled when the daemon's size differs), stage
        it, and copy the previous frame's staged pixels into the input ring."""
        tr = self.texrender
        lib.gs_texrender_reset(tr)
        if lib.gs_texrender_begin(tr, sess.width, sess.height):
            clear = Vec4(0.0, 0.0, 0.0, 0.0)
            lib.gs_clear(obs.GS_CLEAR_COLOR, ctypes.byref(clear), 0.0, 0)
            lib.gs_ortho(0.0, float(w), 0.0, float(h), -100.0, 100.0)
            lib.gs_blend_state_push()
            lib.gs_blend_function(obs.GS_BLEND_ONE, obs.GS_BLEND_ZERO)
            lib.obs_source_video_render(target)
            lib.gs_blend_state_pop()
            lib.gs_texrender_end(tr)
        cur = self.stage_idx
        prev = cur ^ 1
        lib.gs_stage_texture(self.stages[cur], lib.gs_texrender_get_texture(tr))
        self.staged[cur] = True
        self.stage_idx = prev
        if not self.staged[prev]:
            return
        # map the surface staged one frame ago: its copy has finished, so this does not stall the GPU
        ptr = ctypes.c_void_p()
        linesize = U32()
        if not lib.gs_stagesurface_map(self.stages[prev], ctypes.byref(ptr), ctypes.byref(linesize)):
            return
        w, h = sess.width, sess.height
        try:
            row = w * BYTES_PER_PIXEL
            if linesize.value == row:
                pixels = (ctypes.c_char * (row * h)).from_address(ptr.value)
            else:  # padded rows: pack them (still one pass over the frame)
                if self.pack_buf is None or len(self.pack_buf) != row * h:
                    self.pack_buf = bytearray(row * h)
                dst = (ctypes.c_char * (row * h)).from_buffer(self.pack_buf)
                base = ctypes.addressof(dst)
                for y in range(h):
                    ctypes.memmove(base + y * row, ptr.value + y * linesize.value, row)
                pixels = self.pack_buf
            sess.rin.write(pixels, timestamp_ns=time.monotonic_ns())
            self.frames_in += 1
        finally:
            lib.gs_stagesurface_unmap(self.stages[prev])

    def _fetch_output(self, sess: Session) -> None:
        frame = sess.rout.read_latest(copy=False)  # a read-only view into the slot: no copy here
        if frame is None:
            return
        w, h = self.gfx_size
        row = w * BYTES_PER_PIXEL
        if len(frame.data) < row * h:
            return
        if sess.out_base is not None:  # upload straight from shared memory (the ring layout is the wire contract)
            addr = sess.slot_address(frame.seq)
        else:
            data = bytes(frame.data)
            addr = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        lib.gs_texture_set_image(self.out_tex, addr, row, False)
        if not sess.rout.still_valid(frame):
            return  # the daemon lapped us during the upload (4 slots: practically never); the next frame fixes it
        self.have_output = True
        self.frames_out += 1
        if frame.timestamp_ns:
            self.e2e_ns.append(time.monotonic_ns() - frame.timestamp_ns)

    def _draw(self, tex, w: int, h: int) -> None:
        """Draw ``tex`` over the filter's w×h area (stretched when the session size was rounded)."""
        effect = lib.obs_get_base_effect(obs.OBS_EFFECT_DEFAULT)
        while lib.gs_effect_loop(effect, b"Draw"):
            lib.obs_source_draw(tex, 0, 0, w, h, False)

    # -- the daemon connection (worker thread) -----------------------------------------------------------------
    def _install(self, sess: Session | None) -> Session | None:
        """Swap the session the render thread sees. The worker may wait here (briefly); the render thread never."""
        with self.lock:
            old, self.session = self.session, sess
            self.have_output = False if sess is not None else self.have_output
            self.last_out_seq = -1
        return old

    def _close_session(self, ctl, sess: Session | None, *, tell_daemon: bool) -> None:
        if sess is None:
            return
        sess.close()
        if tell_daemon and ctl is not None:
            try:
                ctl.request("close_session", timeout_s=0.5, session_id=sess.session_id)
            except Exception:  # noqa: BLE001 - the daemon may be gone; it reaps sessions without heartbeats
                pass

    def _open(self, ctl) -> Session:
        ring_mod = _STATE.ring
        ctl.request("hello", client=f"obs:{self.name}", protocol=PROTOCOL)
        w, h = self.want_size
        fields = {
            "width": w,
            "height": h,
            "fps": _fps(),
            "pixel_format": PIXEL_FORMAT,
            "transport": "shm",
            "client": f"obs:{self.name}",
            "params": {"steps": self.steps, "noise_scale": self.strength},
        }
        if self.preset:
            fields["preset"] = self.preset
        try:
            reply = ctl.request("open_session", timeout_s=OPEN_TIMEOUT_S, **fields)
        except DaemonReplyError as exc:
            if exc.code != "unknown_preset" or "preset" not in fields:
                raise
            warn(f"filter '{self.name}': preset {self.preset!r} unknown to the daemon; using its default")
            fields.pop("preset")
            reply = ctl.request("open_session", timeout_s=OPEN_TIMEOUT_S, **fields)
        sid = reply["session_id"]
        try:
            rin = ring_mod.FrameRing.open(reply["input_ring"])
            rout = ring_mod.FrameRing.open(reply["output_ring"])
        except Exception:
            try:
                ctl.request("close_session", timeout_s=0.5, session_id=sid)
            except Exception:  # noqa: BLE001
                pass
            raise
        return Session(sid, rin, rout, w, h, reply.get("preset") or self.preset or None)

    def _refresh_presets(self, ctl) -> None:
        try:
            reply = ctl.request("list_presets", timeout_s=COMMAND_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            return
        names = []
        for p in reply.get("presets", []):
            names.append(p.get("name") if isinstance(p, dict) else str(p))
        names = [n for n in names if n]
        if names:
            _STATE.preset_names = names

    def _apply(self, ctl, sess: Session, op: str, arg) -> None:
        if os.environ.get(ENV_INBAND) == "1":
            self._in_band(sess, op, arg)
            return
        try:
            if op == "set_preset":
                ctl.request("set_preset", timeout_s=COMMAND_TIMEOUT_S, session_id=sess.session_id, name=arg)
                sess.preset = arg
                info(f"filter '{self.name}': preset → {arg}")
            elif op == "set_params":
                ctl.request("set_params", timeout_s=COMMAND_TIMEOUT_S, session_id=sess.session_id, **arg)
        except DaemonReplyError as exc:
            warn(f"filter '{self.name}': {op} {arg!r} refused: {exc}")
        except ControlError as exc:
            # A busy daemon (the compute loop answers these) is not a dead one: heartbeats decide liveness. The ring
            # still carries the request.
            warn(f"filter '{self.name}': {op} got no reply ({exc}); asking in-band instead")
            self._in_band(sess, op, arg)

    def _in_band(self, sess: Session, op: str, arg) -> None:
        """Ask through the input ring's control block (DESIGN §4): the daemon polls it, no ZeroMQ needed."""
        try:
            if op == "set_preset":
                sess.rin.request(preset=arg)
                sess.preset = arg
                info(f"filter '{self.name}': preset → {arg} (in-band, ring control block)")
            elif op == "set_params":
                sess.rin.request(steps=arg.get("steps"), noise_scale=arg.get("noise_scale"))
        except Exception as exc:  # noqa: BLE001
            warn(f"filter '{self.name}': in-band {op} failed: {exc}")

    def _run_worker(self) -> None:
        backoff = RECONNECT_INITIAL_S
        ctl = None
        while not self.stop.is_set():
            if _STATE.ring is None or self.want_size == (0, 0):
                self.state = "waiting for the first frame" if _STATE.ring is not None else "no ring module"
                self.wake.wait(0.1)
                self.wake.clear()
                continue
            sess = None
            try:
                ctl = make_control(self.address, self.token)
                self.control_kind = ctl.kind
                self._drain_reconnects()
                sess = self._open(ctl)
                self._refresh_presets(ctl)
                self._install(sess)
                self.state = "connected"
                self.connected_at = time.monotonic()
                info(
                    f"filter '{self.name}': session {sess.session_id} open at {sess.width}x{sess.height} "
                    f"via {ctl.kind} ({self.address})"
                )
                backoff = RECONNECT_INITIAL_S
                self._serve(ctl, sess)
            except (ControlError, DaemonReplyError, OSError, ValueError, KeyError) as exc:
                msg = f"{type(exc).__name__}: {exc}"
                if msg != self.last_error:
                    warn(f"filter '{self.name}': daemon unavailable ({msg}); passing the source through")
                self.last_error = msg
                self.state = "disconnected"
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the thread silently
                self.last_error = f"{type(exc).__name__}: {exc}"
                warn(f"filter '{self.name}': worker error {self.last_error}")
                self.state = "disconnected"
            finally:
                old = self._install(None)
                self._close_session(ctl, old or sess, tell_daemon=self.stop.is_set() or self.state == "reopen")
                if ctl is not None:
                    ctl.close()
                    ctl = None
            if self.stop.is_set():
                break
            if self.state == "reopen":
                continue
            self.wake.wait(backoff)
            self.wake.clear()
            backoff = min(RECONNECT_MAX_S, backoff * 2)
        self.state = "stopped"

    def _drain_reconnects(self) -> None:
        pending = []
        while True:
            try:
                item = self.commands.get_nowait()
            except queue.Empty:
                break
            if item[0] != "reconnect":
                pending.append(item)
        for item in pending:
            if item[0] == "set_preset":
                continue  # the session opens with the current preset
            self.commands.put(item)

    def _serve(self, ctl, sess: Session) -> None:
        misses = 0
        next_beat = time.monotonic() + HEARTBEAT_INTERVAL_S
        while not self.stop.is_set():
            self.wake.wait(0.05)
            self.wake.clear()
            if sess.rin.closed_flag or sess.rout.closed_flag:
                raise ControlError(f"the daemon closed session {sess.session_id}")
            if self.want_size != (sess.width, sess.height):
                info(f"filter '{self.name}': source size changed to {self.want_size}; reopening")
                self.state = "reopen"
                return
            while True:
                try:
                    op, arg = self.commands.get_nowait()
                except queue.Empty:
                    break
                if op == "reconnect":
                    self.state = "reopen"
                    return
                self._apply(ctl, sess, op, arg)
            now = time.monotonic()
            if now < next_beat:
                continue
            next_beat = now + HEARTBEAT_INTERVAL_S
            try:
                ctl.request("heartbeat", timeout_s=HEARTBEAT_INTERVAL_S, session_id=sess.session_id)
                misses = 0
            except ControlError:
                misses += 1
                if misses >= HEARTBEAT_LIVENESS:
                    raise
                next_beat = time.monotonic()  # Paranoid Pirate: retry at once; liveness × interval at most
            except DaemonReplyError as exc:
                if exc.code == "unknown_session":  # the daemon restarted or reaped us: open a new session
                    raise ControlError(f"session {sess.session_id} is gone ({exc})") from None
                raise

    def shutdown(self) -> None:
        self.stop.set()
        self.wake.set()
        obs_enter = lib.obs_enter_graphics
        obs_enter()
        try:
            with self.lock:
                self._destroy_gfx()
        finally:
            lib.obs_leave_graphics()

    def stats(self) -> dict:
        r = list(self.render_ns)
        e = list(self.e2e_ns)
        ms = 1e-6
        return {
            "name": self.name,
            "state": self.state,
            "control": self.control_kind,
            "session_id": self.session.session_id if self.session else None,
            "input_ring": self.session.rin.name if self.session else None,
            "output_ring": self.session.rout.name if self.session else None,
            "preset": self.session.preset if self.session else None,
            "size": list(self.want_size),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "skipped_busy": self.skipped_busy,
            "render_thread_ms_p50": _percentile(r, 0.5) * ms if r else None,
            "render_thread_ms_p99": _percentile(r, 0.99) * ms if r else None,
            "render_samples": len(r),
            "end_to_end_ms_p50": _percentile(e, 0.5) * ms if e else None,
            "end_to_end_samples": len(e),
            "last_error": self.last_error,
        }


# ---------------------------------------------------------------------------------------------------------------
# C callbacks (trampolines): created once per process, they dispatch to the newest loaded code
# ---------------------------------------------------------------------------------------------------------------


def _instance(handle) -> FilterInstance | None:
    return _STATE.instances.get(handle or 0)


def _cb_get_name(_type_data):
    return ctypes.addressof(_STATE.name_buf)


def _cb_create(settings, source):
    try:
        handle = next(_STATE.handles)
        inst = _STATE.impl.FilterInstance(handle, source)
        with _STATE.instances_lock:
            _STATE.instances[handle] = inst
        info(f"filter '{inst.name}' created (instance {handle})")
        inst.update(settings)  # create() calls update()
        return handle
    except Exception as exc:  # noqa: BLE001
        warn(f"create failed: {exc!r}")
        return None


def _cb_destroy(handle):
    with _STATE.instances_lock:
        inst = _STATE.instances.pop(handle or 0, None)
    if inst is not None:
        inst.shutdown()
        info(f"filter '{inst.name}' destroyed (instance {handle})")


def _cb_get_defaults(settings):
    lib.obs_data_set_default_string(settings, KEY_ADDRESS.encode(), DEFAULT_ADDRESS.encode())
    lib.obs_data_set_default_int(settings, KEY_STEPS.encode(), DEFAULT_STEPS)
    lib.obs_data_set_default_double(settings, KEY_STRENGTH.encode(), DEFAULT_STRENGTH)
    lib.obs_data_set_default_string(settings, KEY_WHEN_AWAY.encode(), AWAY_PASSTHROUGH.encode())


def _cb_get_properties(_handle):
    props = lib.obs_properties_create()
    p = lib.obs_properties_add_text(props, KEY_ADDRESS.encode(), b"Daemon address", obs.OBS_TEXT_DEFAULT)
    lib.obs_property_set_long_description(p, b"ZeroMQ control address of `sdlive serve` (default tcp://127.0.0.1:5557)")
    lib.obs_properties_add_text(props, KEY_TOKEN.encode(), b"Token (remote daemons)", obs.OBS_TEXT_PASSWORD)
    p = lib.obs_properties_add_list(
        props, KEY_PRESET.encode(), b"Preset", obs.OBS_COMBO_TYPE_EDITABLE, obs.OBS_COMBO_FORMAT_STRING
    )
    for name in _STATE.preset_names:
        lib.obs_property_list_add_string(p, name.encode(), name.encode())
    lib.obs_properties_add_int_slider(props, KEY_STEPS.encode(), b"Steps", 1, 4, 1)
    lib.obs_properties_add_float_slider(props, KEY_STRENGTH.encode(), b"Strength (noise)", MIN_STRENGTH, 1.0, 0.01)
    p = lib.obs_properties_add_list(
        props, KEY_WHEN_AWAY.encode(), b"While the daemon is away", obs.OBS_COMBO_TYPE_LIST, obs.OBS_COMBO_FORMAT_STRING
    )
    lib.obs_property_list_add_string(p, b"Show the source (pass through)", AWAY_PASSTHROUGH.encode())
    lib.obs_property_list_add_string(p, b"Hold the last styled frame", AWAY_LAST_OUTPUT.encode())
    return props


def _cb_update(handle, settings):
    inst = _instance(handle)
    if inst is not None:
        inst.update(settings)


def _cb_video_render(handle, _effect):
    inst = _instance(handle)
    if inst is None:
        return
    ok = False
    try:
        ok = inst.render()
    finally:
        if not ok:
            lib.obs_source_skip_video_filter(inst.source)


def register_filter() -> None:
    """Register the filter once per process; later script loads only swap the implementation."""
    _STATE.impl = sys.modules[__name__]
    if _STATE.registered:
        info("filter already registered in this OBS process; reusing it")
        return
    callbacks = {
        "get_name": GET_NAME(lambda d: _STATE.impl._cb_get_name(d)),
        "create": CREATE(lambda s, src: _STATE.impl._cb_create(s, src)),
        "destroy": DESTROY(lambda h: _STATE.impl._cb_destroy(h)),
        "get_defaults": GET_DEFAULTS(lambda s: _STATE.impl._cb_get_defaults(s)),
        "get_properties": GET_PROPERTIES(lambda h: _STATE.impl._cb_get_properties(h)),
        "update": UPDATE(lambda h, s: _STATE.impl._cb_update(h, s)),
        "video_render": VIDEO_RENDER(lambda h, e: _STATE.impl._cb_video_render(h, e)),
    }
    si = SourceInfo()
    si.id = FILTER_ID
    si.type = obs.OBS_SOURCE_TYPE_FILTER
    si.output_flags = obs.OBS_SOURCE_VIDEO
    for field, fn in callbacks.items():
        setattr(si, field, fn)
    _STATE.info, _STATE.callbacks, _STATE.id_buf = si, callbacks, FILTER_ID  # alive for the whole process
    lib.obs_register_source_s(ctypes.byref(si), ctypes.sizeof(si))
    _STATE.registered = True
    info(f"registered video filter '{FILTER_ID.decode()}' (obs_source_info prefix of {ctypes.sizeof(si)} bytes)")


# ---------------------------------------------------------------------------------------------------------------
# Hotkeys
# ---------------------------------------------------------------------------------------------------------------
_hotkeys: dict[str, int] = {}  # hotkey name → id (this script load)


def _for_each_instance(fn) -> None:
    with _STATE.instances_lock:
        insts = list(_STATE.instances.values())
    for inst in insts:
        try:
            fn(inst)
        except Exception as exc:  # noqa: BLE001
            warn(f"hotkey on '{inst.name}': {exc!r}")


def _select_preset(name: str) -> None:
    info(f"hotkey: preset {name}")
    _for_each_instance(lambda inst: inst.set_preset_from_hotkey(name))


def _step_preset(delta: int) -> None:
    names = _STATE.preset_names
    if not names:
        return

    def step(inst: FilterInstance) -> None:
        # The filter's latest request (hotkey or properties) first: the daemon's reply to it, which updates the
        # session's preset, may still be on its way when the next key comes.
        current = inst.preset or (inst.session.preset if inst.session else "")
        i = names.index(current) if current in names else (-1 if delta > 0 else 0)
        inst.set_preset_from_hotkey(names[(i + delta) % len(names)])

    _for_each_instance(step)


def _key_combo_data(spec: str) -> list[dict]:
    """"ctrl+shift+1" → the obs_data form of one key combination (obs_hotkey_load's array)."""
    mods = {"ctrl": "control", "control": "control", "shift": "shift", "alt": "alt", "cmd": "command"}
    combo: dict = {}
    for part in spec.lower().split("+"):
        part = part.strip()
        if part in mods:
            combo[mods[part]] = True
        elif part:
            combo["key"] = "OBS_KEY_" + part.upper()
    return [combo] if "key" in combo else []


def register_hotkeys(settings) -> None:
    defaults = scan_preset_files()
    cached = []
    raw = obs.obs_data_get_string(settings, KEY_KNOWN_PRESETS)
    if raw:
        try:
            cached = [str(n) for n in json.loads(raw)]
        except ValueError:
            cached = []
    names = list(defaults) + [n for n in cached if n not in defaults]
    if not _STATE.preset_names:
        _STATE.preset_names = names
    saved = obs.obs_data_get_obj(settings, KEY_HOTKEYS)
    entries = [(HOTKEY_NEXT, "sdlive: next preset", lambda: _step_preset(+1), None)]
    entries.append((HOTKEY_PREV, "sdlive: previous preset", lambda: _step_preset(-1), None))
    for name in names:
        entries.append((HOTKEY_PREFIX + name, f"sdlive: preset {name}", (lambda n=name: _select_preset(n)),
                        defaults.get(name)))
    for hk_name, desc, action, default_combo in entries:
        def cb(pressed, action=action):
            if pressed:
                action()

        hk_id = obs.obs_hotkey_register_frontend(hk_name, desc, cb)
        _hotkeys[hk_name] = hk_id
        arr = obs.obs_data_get_array(saved, hk_name) if saved else None
        if arr is None and default_combo and not saved:
            # first run: bind the preset file's default key (the user can change it in Settings → Hotkeys)
            arr = obs.obs_data_array_create()
            for combo in _key_combo_data(default_combo):
                item = obs.obs_data_create_from_json(json.dumps(combo))
                obs.obs_data_array_push_back(arr, item)
                obs.obs_data_release(item)
        if arr is not None:
            obs.obs_hotkey_load(hk_id, arr)
            obs.obs_data_array_release(arr)
    if saved:
        obs.obs_data_release(saved)
    info(f"hotkeys registered: {', '.join(n for n, *_ in entries)}")


def save_hotkeys(settings) -> None:
    saved = obs.obs_data_create()
    for hk_name, hk_id in _hotkeys.items():
        arr = obs.obs_hotkey_save(hk_id)
        obs.obs_data_set_array(saved, hk_name, arr)
        obs.obs_data_array_release(arr)
    obs.obs_data_set_obj(settings, KEY_HOTKEYS, saved)
    obs.obs_data_release(saved)
    obs.obs_data_set_string(settings, KEY_KNOWN_PRESETS, json.dumps(_STATE.preset_names))


# ---------------------------------------------------------------------------------------------------------------
# Stats file (bench/tests): rewritten once a second when SDLIVE_OBS_STATS is set
# ---------------------------------------------------------------------------------------------------------------


def _stats_loop(path: str, stop: threading.Event) -> None:
    tmp = path + ".tmp"
    while not stop.wait(0.5):
        with _STATE.instances_lock:
            insts = list(_STATE.instances.values())
        doc = {
            "pid": os.getpid(),
            "time": time.time(),
            "pyzmq": zmq is not None,
            "hotkeys": sorted(_hotkeys),
            "presets": list(_STATE.preset_names),
            "filters": [i.stats() for i in insts],
        }
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(doc, fh)
            os.replace(tmp, path)
        except OSError:
            pass


_stats_stop = threading.Event()


# ---------------------------------------------------------------------------------------------------------------
# OBS script entry points
# ---------------------------------------------------------------------------------------------------------------


def script_description() -> str:
    return (
        "<b>sdlive</b>: real-time generative restyling. Adds the <b>sdlive</b> video filter (right-click a source → "
        "Filters → + → sdlive). Start the daemon with <code>sdlive serve</code>. Hotkeys: Settings → Hotkeys → "
        "\"sdlive: preset …\"."
    )


def script_load(settings) -> None:
    if _STATE.ring is None:
        try:
            _STATE.ring = load_ring_module()
        except Exception as exc:  # noqa: BLE001
            warn(str(exc))
    register_filter()
    register_hotkeys(settings)
    path = os.environ.get(ENV_STATS)
    if path:
        _stats_stop.clear()
        t = threading.Thread(target=_stats_loop, args=(path, _stats_stop), name="sdlive-stats", daemon=True)
        t.start()
        _STATE.stats_thread = t
    if zmq is not None:
        info(f"script loaded (Python {sys.version.split()[0]}; control client: pyzmq {zmq.__version__})")
    else:
        info(f"script loaded (Python {sys.version.split()[0]}; control client: stdlib ZMTP; pyzmq not importable: "
             f"{ZMQ_IMPORT_ERROR}; sys.path={sys.path})")


def script_save(settings) -> None:
    save_hotkeys(settings)


def script_unload() -> None:
    # Live filter instances keep running on the persistent state (libobs owns them); only this load's extras stop.
    _stats_stop.set()
    t = _STATE.stats_thread
    if t is not None:
        t.join(timeout=1.0)
        _STATE.stats_thread = None
    for hk_id in _hotkeys.values():
        obs.obs_hotkey_unregister(hk_id)
    _hotkeys.clear()
    info("script unloaded")
