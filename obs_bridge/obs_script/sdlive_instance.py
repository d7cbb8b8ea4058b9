"""One sdlive filter on one source: its settings, the session the render thread uses, and its figures.

Threads: OBS calls ``update`` and hotkeys call ``select_preset`` from its UI thread, ``render`` from the graphics
thread (once per view per frame), and the DaemonLink worker swaps sessions in through ``_install``. ``lock`` guards
the session and the graphics objects; the render thread only try-acquires it and passes the source through when it
is busy, so OBS never waits for sdlive.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import sdlive_settings
from sdlive_link import DaemonLink, Session
from sdlive_names import AWAY_LAST_OUTPUT
from sdlive_obs_api import graphics, info, lib
from sdlive_render import FrameBridge, session_size
from sdlive_settings import FilterSettings
from sdlive_stats import TIMING_WINDOW, percentile

STOP_TIMEOUT_S = 2.0  # a worker closes its session within CLOSE_TIMEOUT_S; one stuck in a connect gives up in 1 s


class FilterInstance:
    def __init__(self, handle: int, source: int):
        self.handle = handle
        self.source = source
        self.name = (lib.obs_source_get_name(source) or b"?").decode("utf-8", "replace")
        self.lock = threading.Lock()
        self.session: Session | None = None
        self.frames = FrameBridge()
        self.settings = FilterSettings()
        self.want_size = (0, 0)  # the session size the source needs (render thread writes, worker reads)
        self.last_frame_time = 0
        self.link = DaemonLink(self.name, lambda: self.settings, lambda: self.want_size, self._install)
        # figures (render thread writes, stats thread reads; deques are thread safe for append and copy)
        self.render_ns: collections.deque[int] = collections.deque(maxlen=TIMING_WINDOW)
        self.e2e_ns: collections.deque[int] = collections.deque(maxlen=TIMING_WINDOW)
        self.frames_in = 0
        self.frames_out = 0
        self.skipped_busy = 0
        self.render_error = ""

    # -- settings (UI thread) ------------------------------------------------------------------------------------
    def update(self, settings: int) -> None:
        new, old = sdlive_settings.read(settings), self.settings
        self.settings = new
        if (new.address, new.token) != (old.address, old.token):
            self.link.reopen()
        else:
            if new.preset and new.preset != old.preset:
                self.link.request_preset(new.preset)
            if new.params() != old.params():
                self.link.request_params(new.params())
        info(f"filter '{self.name}': address={new.address} preset={new.preset or '(daemon default)'} "
             f"steps={new.steps} strength={new.strength:.2f} when_away={new.when_away}")
        self.link.start()

    def select_preset(self, name: str) -> None:
        """A preset hotkey: switch the session and show the choice in the filter's settings."""
        sdlive_settings.set_preset(self.source, name)
        self.settings = self.settings._replace(preset=name)
        self.link.request_preset(name)

    def current_preset(self) -> str:
        """The newest preset asked for (the daemon's reply to it may still be on its way), else the session's."""
        sess = self.session
        return self.settings.preset or (sess.preset if sess and sess.preset else "")

    # -- graphics thread -----------------------------------------------------------------------------------------
    def render(self) -> bool:
        """Draw the filter's output; False to pass the source through. Never waits."""
        t0 = time.perf_counter_ns()
        target = lib.obs_filter_get_target(self.source)
        if not target:
            return False
        w = lib.obs_source_get_base_width(target)
        h = lib.obs_source_get_base_height(target)
        if not w or not h:
            return False
        size = session_size(w, h)
        self.want_size = size
        if not self.lock.acquire(blocking=False):
            self.skipped_busy += 1
            return False
        try:
            sess = self.session
            frames = self.frames
            if sess is None or (sess.width, sess.height) != size:
                if sess is not None:
                    self.link.wake()  # the worker reopens at the new size
                if self.settings.when_away == AWAY_LAST_OUTPUT and frames.have_output and frames.size == size:
                    frames.draw_output(w, h)
                    return True
                return False
            frames.ensure(*size)
            frame_time = lib.obs_get_video_frame_time()
            captured = frame_time != self.last_frame_time
            if captured:  # once per output frame, whatever the number of views
                self.last_frame_time = frame_time
                if frames.capture(self.source, w, h, sess.rin):
                    self.frames_in += 1
                stamp = frames.fetch_output(sess.rout)
                if stamp is not None:
                    self.frames_out += 1
                    if stamp:
                        self.e2e_ns.append(time.monotonic_ns() - stamp)
            if captured:
                self.render_ns.append(time.perf_counter_ns() - t0)
            if not frames.have_output:
                return False  # no styled frame back yet: the source itself, drawn by libobs
            frames.draw_output(w, h)
            return True
        except Exception as exc:  # noqa: BLE001 - never let an exception reach libobs; pass through instead
            self.render_error = f"{type(exc).__name__}: {exc}"
            return False
        finally:
            self.lock.release()

    # -- worker thread -------------------------------------------------------------------------------------------
    def _install(self, sess: Session | None) -> Session | None:
        """Swap the session the render thread sees; the worker may wait here briefly, the render thread never."""
        with self.lock:
            old, self.session = self.session, sess
            if sess is not None:
                self.frames.have_output = False
        return old

    # -- lifetime (UI thread) ------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the worker (it closes the session) and wait for it, so no sdlive thread outlives the filter, then
        free the graphics objects."""
        self.link.stop()
        self.link.join(STOP_TIMEOUT_S)
        with graphics(), self.lock:
            self.frames.destroy()

    def stats(self) -> dict[str, Any]:
        r = list(self.render_ns)
        e = list(self.e2e_ns)
        sess = self.session
        return {
            "name": self.name,
            "state": self.link.state,
            "session_id": sess.session_id if sess else None,
            "input_ring": sess.rin.name if sess else None,
            "output_ring": sess.rout.name if sess else None,
            "preset": sess.preset if sess else None,
            "size": list(self.want_size),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "skipped_busy": self.skipped_busy,
            "render_thread_ms_p50": _ms(percentile(r, 0.5)),
            "render_thread_ms_p99": _ms(percentile(r, 0.99)),
            "render_samples": len(r),
            "end_to_end_ms_p50": _ms(percentile(e, 0.5)),
            "end_to_end_samples": len(e),
            "last_error": self.link.last_error,
            "render_error": self.render_error,
        }


def _ms(ns: float | None) -> float | None:
    return ns * 1e-6 if ns is not None else None
