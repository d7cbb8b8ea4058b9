"""SLO-aware mode choice (DESIGN §3, upstream's ``SLOAdaptiveSingleGPUInferencePipeline``).

The stream batch pipelines n denoising steps over n chunks: best throughput, but a frame leaves n chunks later.
When a session falls behind — the frame being taken has waited ``wait_s`` (0.5 s) or more since it arrived — the
session falls back to no-batch mode, the lowest-latency one (a chunk leaves as soon as it is computed). It returns to
the stream batch once waits have stayed under ``recover_wait_s`` for ``recover_after_s``, so a single slow chunk does
not make it flap; the deadline scheduler (``scheduler.py``) also asks that the modelled load allows the return
(``load_allows``). Only sessions that asked for the stream batch with 2+ steps are concerned (at 1 step both modes
are the same).
"""

from __future__ import annotations

SLO_WAIT_S = 0.5
RECOVER_WAIT_S = 0.25
RECOVER_AFTER_S = 5.0


class SloGuard:
    """Decides, frame by frame, whether a session should run in stream-batch mode."""

    def __init__(
        self,
        *,
        wait_s: float = SLO_WAIT_S,
        recover_wait_s: float = RECOVER_WAIT_S,
        recover_after_s: float = RECOVER_AFTER_S,
    ) -> None:
        self.wait_s = wait_s
        self.recover_wait_s = recover_wait_s
        self.recover_after_s = recover_after_s
        self.fallback = False
        self.switches = 0
        self._calm_since: float | None = None

    def observe(
        self, *, wait_s: float, now_s: float, wants_stream_batch: bool, load_allows: bool = True
    ) -> bool | None:
        """The stream-batch setting to switch to now, or None to keep the current one.

        ``wait_s``: how long the frame about to be pushed waited; ``wants_stream_batch``: the session asked for the
        stream batch and runs 2+ steps; ``load_allows``: the return to the stream batch fits the device's modelled
        load (while it does not, the session stays in no-batch mode and returns as soon as it does)."""
        if not wants_stream_batch:
            self.fallback, self._calm_since = False, None
            return None
        if not self.fallback:
            if wait_s >= self.wait_s:
                self.fallback, self._calm_since = True, None
                self.switches += 1
                return False
            return None
        if wait_s >= self.recover_wait_s:
            self._calm_since = None
            return None
        if self._calm_since is None:
            self._calm_since = now_s
        if now_s - self._calm_since >= self.recover_after_s and load_allows:
            self.fallback, self._calm_since = False, None
            self.switches += 1
            return True
        return None
