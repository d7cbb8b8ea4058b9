"""One filter's connection to the daemon: a worker thread that opens a session, keeps it alive and forwards the
filter's preset and parameter changes.

hello → open_session (the filter's size, OBS's frame rate, BGRA over shared memory) → list_presets → a heartbeat
every interval (liveness: ``heartbeat_liveness`` missed beats in a row and the session is lost) → on loss, close and
reconnect with doubling backoff. Intervals come from the daemon's ``hello`` reply, defaulting to the wire contract's
constants. The daemon's IO thread answers ``set_preset`` / ``set_params`` on receipt, so a reply that does not come
in time means a lost message or a dead daemon: the change is kept and asked again on the next pass, and the
heartbeats decide when to give the session up. Changes that pile up meanwhile collapse into one (the newest preset,
the newest parameters).

The render thread never waits for this thread: the session is swapped in and out through ``install``, which takes
the filter's lock only for the swap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import sdlive_state as state
from sdlive_contract import constants, ring
from sdlive_control import ControlError, DaemonReplyError, RefusedError, StdlibControl
from sdlive_obs_api import info, video_fps, warn
from sdlive_render import PIXEL_FORMAT
from sdlive_settings import FilterSettings

OPEN_TIMEOUT_S = 15.0  # open_session: the daemon allocates the model session before it answers
CLOSE_TIMEOUT_S = 0.5  # close_session on the way out: the daemon reaps silent sessions anyway
POLL_S = 0.05  # the worker's idle wake-up: commands and size changes are noticed this fast without a wake()


def failure_kind(exc: BaseException) -> str:
    """What a failure is, without its details (an OS error number, a resolver's changing words): the filter logs a
    failure once per kind."""
    return f"{type(exc).__name__}: {str(exc).split(': ')[0]}"


def explain(exc: BaseException) -> str:
    """The log line for a failure to reach the daemon: what happened and the fix."""
    if isinstance(exc, ValueError):
        return f"{exc}; fix the daemon address in the filter's properties (default {constants.DEFAULT_CONTROL_ADDRESS})"
    if isinstance(exc, DaemonReplyError) and exc.code == "capacity":
        return (f"the daemon has no free session ({exc}); each sdlive filter takes one session, at most "
                "max_sessions at once (4 unless the daemon's config.toml or SDLIVE_MAX_SESSIONS says otherwise): "
                "remove or disable a filter, or raise max_sessions and restart the daemon")
    if isinstance(exc, RefusedError):
        return f"{exc}: is the daemon running? Start it with `sdlive serve` (or check the address)"
    return f"daemon unavailable ({type(exc).__name__}: {exc})"


class Session:
    """An open daemon session: its id, the two rings, the size it runs at and the preset the daemon applied."""

    def __init__(self, session_id: str, rin: Any, rout: Any, width: int, height: int, preset: str | None):
        self.session_id = session_id
        self.rin = rin
        self.rout = rout
        self.width = width
        self.height = height
        self.preset = preset

    def close(self) -> None:
        for r in (self.rin, self.rout):
            try:
                r.close()
            except Exception:  # noqa: BLE001 - closing a ring whose daemon died must not stop the worker
                pass


class Reopen(Exception):
    """Close this session and open a new one at once (size or address changed), without backoff."""


class DaemonLink:
    """The worker thread of one filter instance. ``settings()`` and ``size()`` read the filter's current wishes,
    ``fps()`` the frame rate sessions open at; ``install(session)`` swaps the session the render thread sees and
    returns the previous one."""

    def __init__(self, name: str, settings: Callable[[], FilterSettings], size: Callable[[], tuple[int, int]],
                 install: Callable[[Session | None], Session | None], fps: Callable[[], float] = video_fps):
        self.name = name
        self._settings = settings
        self._size = size
        self._install = install
        self._fps = fps
        self._lock = threading.Lock()  # guards the pending changes below
        self._want_preset: str | None = None
        self._want_params: dict[str, object] = {}
        self._want_reopen = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctl: StdlibControl | None = None  # the worker's connection, for stop() to abort
        self.state = "starting"
        self.last_error = ""
        self._failure = ""  # the kind of the failure logged last (failure_kind), "" while connected

    # -- called from OBS's threads ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"sdlive-{self.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Ask the worker to close its session and end; a request it is waiting on is cut short."""
        self._stop.set()
        self._wake.set()
        ctl = self._ctl
        if ctl is not None:
            ctl.abort()

    def join(self, timeout_s: float) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def wake(self) -> None:
        self._wake.set()

    def request_preset(self, name: str) -> None:
        with self._lock:
            self._want_preset = name
        self._wake.set()

    def request_params(self, params: dict[str, object]) -> None:
        with self._lock:
            self._want_params.update(params)
        self._wake.set()

    def reopen(self) -> None:
        """Drop the session and connect again (the address or token changed)."""
        with self._lock:
            self._want_reopen = True
        self._wake.set()

    # -- the worker thread -----------------------------------------------------------------------------------------
    def _take_pending(self) -> tuple[str | None, dict[str, object], bool]:
        with self._lock:
            pending = (self._want_preset, self._want_params, self._want_reopen)
            self._want_preset, self._want_params, self._want_reopen = None, {}, False
        return pending

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _run(self) -> None:
        backoff = constants.RECONNECT_INTERVAL_INIT_S
        while not self._stop.is_set():
            if self._size() == (0, 0):
                self.state = "waiting for the first frame"
                self._sleep(POLL_S * 2)
                continue
            self._take_pending()  # the session opens with the settings as they are now
            settings = self._settings()
            ctl = None
            sess = None
            reopen = False
            try:
                ctl = self._ctl = StdlibControl(settings.address, settings.token)
                if self._stop.is_set():
                    break
                beat_s, liveness = self._hello(ctl)
                sess = self._open(ctl, settings)
                self._refresh_presets(ctl)
                self._install(sess)
                self.state = "connected"
                self._failure = ""
                info(f"filter '{self.name}': session {sess.session_id} open at {sess.width}x{sess.height} "
                     f"({settings.address})")
                backoff = constants.RECONNECT_INTERVAL_INIT_S
                self._serve(ctl, sess, beat_s, liveness)
            except Reopen as exc:
                info(f"filter '{self.name}': {exc}; reopening")
                reopen = True
            except (ControlError, DaemonReplyError, OSError, ValueError, KeyError) as exc:
                kind = failure_kind(exc)
                if kind != self._failure:  # one line per kind of failure, then quiet until it changes or recovers
                    warn(f"filter '{self.name}': {explain(exc)}; passing the source through")
                self._failure = kind
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.state = "disconnected"
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the thread silently
                self.last_error = f"{type(exc).__name__}: {exc}"
                warn(f"filter '{self.name}': worker error {self.last_error}")
                self.state = "disconnected"
            finally:
                old = self._install(None) or sess
                if old is not None:
                    old.close()
                    if ctl is not None and (reopen or self._stop.is_set()):
                        self._close_session(ctl, old.session_id)
                if ctl is not None:
                    self._ctl = None
                    ctl.close()
            if self._stop.is_set():
                break
            if not reopen:
                self._sleep(backoff)
                backoff = min(constants.RECONNECT_INTERVAL_MAX_S, backoff * 2)
        self.state = "stopped"

    def _hello(self, ctl: StdlibControl) -> tuple[float, int]:
        """Check the daemon speaks our protocol; its heartbeat interval and liveness."""
        reply = ctl.request("hello", client=f"obs:{self.name}", protocol=constants.PROTOCOL_VERSION)
        if reply.get("protocol") != constants.PROTOCOL_VERSION:
            raise ControlError(f"the daemon at {ctl.address} speaks {reply.get('protocol')!r}, this filter "
                               f"{constants.PROTOCOL_VERSION!r}: upgrade sdlive on both sides")
        beat_s = float(reply.get("heartbeat_interval_s") or constants.HEARTBEAT_INTERVAL_S)
        liveness = int(reply.get("heartbeat_liveness") or constants.HEARTBEAT_LIVENESS)
        return beat_s, liveness

    def _open(self, ctl: StdlibControl, settings: FilterSettings) -> Session:
        width, height = self._size()
        fields: dict[str, Any] = {
            "width": width,
            "height": height,
            "fps": self._fps(),
            "pixel_format": PIXEL_FORMAT,
            "transport": "shm",
            "client": f"obs:{self.name}",
            "params": settings.params(),
        }
        if settings.preset:
            fields["preset"] = settings.preset
        try:
            reply = ctl.request("open_session", timeout_s=OPEN_TIMEOUT_S, **fields)
        except DaemonReplyError as exc:
            if exc.code != "unknown_preset" or "preset" not in fields:
                raise
            warn(f"filter '{self.name}': preset {settings.preset!r} unknown to the daemon; using its default")
            fields.pop("preset")
            reply = ctl.request("open_session", timeout_s=OPEN_TIMEOUT_S, **fields)
        sid = reply["session_id"]
        try:
            rin = ring.FrameRing.open(reply["input_ring"])
            rout = ring.FrameRing.open(reply["output_ring"])
        except Exception:
            self._close_session(ctl, sid)
            raise
        return Session(sid, rin, rout, width, height, reply.get("preset") or settings.preset or None)

    def _close_session(self, ctl: StdlibControl, session_id: str) -> None:
        try:
            ctl.request("close_session", timeout_s=CLOSE_TIMEOUT_S, session_id=session_id)
        except (ControlError, DaemonReplyError, OSError):
            pass  # the daemon may be gone; it reaps sessions without heartbeats

    def _refresh_presets(self, ctl: StdlibControl) -> None:
        """The daemon's presets (names and default keys) become the list next/prev cycle through."""
        try:
            reply = ctl.request("list_presets")
        except (ControlError, DaemonReplyError, OSError):
            return
        known: dict[str, str | None] = {}
        for p in reply.get("presets", []):
            if isinstance(p, dict) and p.get("name"):
                known[str(p["name"])] = str(p["hotkey"]) if p.get("hotkey") else None
        if known:
            state.preset_names = list(known)
            state.daemon_presets = known

    def _serve(self, ctl: StdlibControl, sess: Session, beat_s: float, liveness: int) -> None:
        misses = 0
        next_beat = time.monotonic() + beat_s
        while not self._stop.is_set():
            self._sleep(POLL_S)
            if sess.rin.closed_flag or sess.rout.closed_flag:
                raise ControlError(f"the daemon closed session {sess.session_id}")
            if self._size() != (sess.width, sess.height):
                raise Reopen(f"source size changed to {self._size()}")
            preset, params, reopen = self._take_pending()
            if reopen:
                raise Reopen("address or token changed")
            if preset is not None and not self._change(ctl, sess, "set_preset", {"name": preset}):
                self._keep_preset(preset)
            if params and not self._change(ctl, sess, "set_params", params):
                self._keep_params(params)
            if ctl.peer_closed():
                next_beat = 0.0  # the daemon dropped the connection: learn now whether it is still there
            now = time.monotonic()
            if now < next_beat:
                continue
            next_beat = now + beat_s
            try:
                ctl.request("heartbeat", timeout_s=beat_s, session_id=sess.session_id)
                misses = 0
            except RefusedError:
                raise  # nothing listens at the address any more: the daemon is gone, no point in waiting
            except ControlError:
                misses += 1
                if misses >= liveness:
                    raise
                next_beat = time.monotonic()  # Paranoid Pirate: retry at once; liveness × interval at most
            except DaemonReplyError as exc:
                if exc.code == "unknown_session":  # the daemon restarted or reaped us: open a new session
                    raise ControlError(f"session {sess.session_id} is gone ({exc})") from None
                raise

    def _change(self, ctl: StdlibControl, sess: Session, op: str, fields: dict[str, Any]) -> bool:
        """Ask for one change. False when it got no reply (ask again later); a refusal is logged and dropped."""
        try:
            reply = ctl.request(op, session_id=sess.session_id, **fields)
        except DaemonReplyError as exc:
            warn(f"filter '{self.name}': {op} {fields!r} refused: {exc}")
            return True
        except ControlError as exc:
            warn(f"filter '{self.name}': {op} {fields!r} got no reply ({exc}); asking again")
            return False
        if op == "set_preset":
            sess.preset = str(fields["name"])
        info(f"filter '{self.name}': {op} {fields!r} accepted" + (" (pending)" if reply.get("pending") else ""))
        return True

    def _keep_preset(self, name: str) -> None:
        """Keep an unanswered preset change for the next pass, unless a newer one came meanwhile."""
        with self._lock:
            if self._want_preset is None:
                self._want_preset = name

    def _keep_params(self, params: dict[str, object]) -> None:
        """Keep unanswered parameters for the next pass; newer values of the same fields win."""
        with self._lock:
            self._want_params = {**params, **self._want_params}
