"""The deadline scheduler: the policy of the compute loop, separate from its mechanism (``loop.py``).

Pure Python (no torch, no ZeroMQ, no clock of its own): the loop describes each session as a :class:`SessionView`
(its fps, the arrival times of the frames it holds, its mode), feeds measured push times back with
:meth:`DeadlineScheduler.observe`, and asks :meth:`DeadlineScheduler.plan` once per pass what to do. The answer
(:class:`Plan`) says which sessions run, in which order, which of them share one DiT forward, which frames to drop
and which sessions switch between the stream batch and no-batch mode. Time is always passed in (``now_ns``), so
tests drive it with a fake clock and a model of step cost.

The rules, in the order a pass applies them:

1. **Deadlines.** A frame of a session at ``fps`` must enter the engine by ``arrival + deadline_s(fps)``, with
   ``deadline_s = max(SLO_WAIT_S, DEADLINE_FRAMES / fps) + CHUNK_FRAMES / fps``: two chunks of frame periods (a
   chunk itself holds its first frame for up to four periods) or the 0.5 s SLO wait, whichever is longer, plus one
   chunk, so that the SLO fallback (rule 2) acts before frames are dropped. A push after its frame's deadline is a
   **miss**.
2. **Mode** (live sessions that asked for the stream batch with 2+ steps; ``slo.SloGuard``'s thresholds and its
   no-flapping rule): when the oldest frame a session holds has waited ``>= 0.5 s`` it falls back to no-batch mode,
   the lowest-latency one; it returns to the stream batch once waits stayed under 0.25 s for 5 s **and** the
   modelled load allows it (the utilisation with that session back in stream-batch mode stays under
   ``max_utilisation``, from the measured ms per push of each session in each mode).
3. **Order: earliest deadline first, with aging.** Sessions with a frame run in the order of their oldest frame's
   deadline minus ``AGING_S`` for every pass they were left out (ties: the one served least recently first). A pass
   runs at most one push per session (fairness: every session with input gets one push per pass while the pass
   fits) and stops adding sessions once the modelled cost of the pass exceeds the shortest frame period among the
   live sessions waiting (the first group always runs). An offline session has no deadline: it sorts as if its
   frame had just arrived. A session left out sorts ``AGING_S`` earlier on every
   later pass, so it reaches the front after a bounded number of passes: **no session starves**, whatever its fps.
4. **Drops rather than drift** (live sessions only; offline sessions never drop or miss). Walking the order, each
   session's predicted start is now plus the modelled cost of the pushes before it; its oldest frames are dropped
   while one of them cannot meet its deadline by then, and beyond ``max_backlog`` frames (default: as many as
   arrive within a deadline, ``floor(deadline_s * fps) + 1``); the newest frame is always
   kept, so a session under any load keeps moving. Every drop is counted (``dropped_late``).
5. **Session batching.** Sessions whose ``batch_key`` is equal (same size and chunk shape: the engine decides what
   is compatible) and whose next push runs the DiT share one forward, each with its own KV-cache slots, unless
   batching is off or measurements show a shared forward costs each member no less than running alone.
6. **Alignment of batching partners** (live sessions of one ``batch_key`` and fps, past their first chunk). Their
   chunks only share a forward when they complete in the same pass. A session whose chunk is ready waits (is
   *held*) for a partner whose chunk frame is the next to arrive, at most one frame period and only while its
   frame's deadline leaves room for that and its push: sources that are not in step cost the earlier one up to a
   period per chunk. A partner two or three frames off in its chunk is brought in step once, by dropping one or two
   of its next frames (``ALIGN_COOLDOWN_S`` between two such alignments of a session; counted as drops).

Costs: per session and mode an EWMA (``EWMA_ALPHA``) of the ms one push took (a push that only buffers a frame
costs ~0, a chunk's push the whole chunk, so the mean is what a frame costs); an unmeasured session borrows the mean
of the measured ones (0 while none is).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace

from .slo import RECOVER_AFTER_S, RECOVER_WAIT_S, SLO_WAIT_S, SloGuard

__all__ = [
    "AGING_S",
    "DEADLINE_FRAMES",
    "DeadlineScheduler",
    "EWMA_ALPHA",
    "MAX_UTILISATION",
    "Plan",
    "SessionView",
    "deadline_s",
]

DEADLINE_FRAMES = 8
"""A frame's deadline, in frame periods after its arrival (two chunks), never under the SLO wait; plus a chunk."""
CHUNK_FRAMES = 4
AGING_S = 0.1
"""How much earlier a session sorts for every pass it was left out (anti-starvation)."""
EWMA_ALPHA = 0.2
"""Weight of a new measurement in the per-session, per-mode cost estimate."""
ALIGN_COOLDOWN_S = 5.0
"""Least time between two alignments (rule 6) of one session."""
MAX_UTILISATION = 0.9
"""The modelled load (busy fraction of the device) up to which a fallen-back session may return to the stream batch."""


def deadline_s(fps: float) -> float:
    """Seconds a frame of a ``fps`` stream may wait before it enters the engine (rule 1 of the module docstring)."""
    return max(SLO_WAIT_S, DEADLINE_FRAMES / fps) + CHUNK_FRAMES / fps


@dataclass(frozen=True)
class SessionView:
    """What the scheduler needs to know of one session for one pass.

    ``arrivals_ns``: arrival times of the frames it holds, oldest first (empty: nothing to do). ``wants_stream_batch``:
    it asked for the stream batch and runs 2+ steps; ``stream_batch``: the mode it runs in now. ``batch_key``:
    sessions with equal keys may share one forward (``None``: never). ``runs_chunk``: its next push runs the DiT
    (a push that only buffers a frame is never batched). ``frames_to_chunk``: pushes before the one that runs its
    next chunk (0: the next push runs it; ``None``: unknown, or its first chunk, which is never aligned)."""

    session_id: str
    fps: float
    arrivals_ns: Sequence[int] = ()
    live: bool = True
    wants_stream_batch: bool = False
    stream_batch: bool = False
    batch_key: Hashable | None = None
    runs_chunk: bool = False
    frames_to_chunk: int | None = None


@dataclass
class Plan:
    """One pass: ``groups`` run in order, each a list of session ids whose push shares one forward (one id: alone);
    ``drops``: frames to drop from the front of each session's queue; ``switches``: the stream-batch setting a session
    switches to before its push; ``deferred``: sessions with input left for the next pass; ``misses``: sessions
    whose pushed frame is past its deadline; ``held``: sessions held for a batching partner."""

    groups: list[list[str]] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)
    switches: dict[str, bool] = field(default_factory=dict)
    deferred: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    held: dict[str, int] = field(default_factory=dict)
    """Sessions held back this pass to share a forward with a partner (rule 6): until when (ns) at the latest."""

    @property
    def order(self) -> list[str]:
        """Every session that runs this pass, in order."""
        return [sid for group in self.groups for sid in group]


@dataclass
class _State:
    guard: SloGuard
    cost_ms: dict[bool, float] = field(default_factory=dict)  # stream_batch -> EWMA ms per push
    skips: int = 0
    last_pass: int = -1
    drops: int = 0
    misses: int = 0
    last_arrival_ns: int | None = None
    align_debt: int = 0  # frames still to drop to bring the session in step with its partners
    aligned_at_s: float = -math.inf


class DeadlineScheduler:
    """Decides, per pass, the order, the shared forwards, the drops and the modes of the sessions (module docstring).

    ``batching``: let compatible sessions share one forward. The thresholds default to ``slo.py``'s."""

    def __init__(
        self,
        *,
        batching: bool = True,
        wait_s: float = SLO_WAIT_S,
        recover_wait_s: float = RECOVER_WAIT_S,
        recover_after_s: float = RECOVER_AFTER_S,
        max_utilisation: float = MAX_UTILISATION,
        max_backlog: int | None = None,
        aging_s: float = AGING_S,
    ) -> None:
        if max_backlog is not None and max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1, got {max_backlog}")
        self.batching = batching
        self.wait_s = wait_s
        self.recover_wait_s = recover_wait_s
        self.recover_after_s = recover_after_s
        self.max_utilisation = max_utilisation
        self.max_backlog = max_backlog
        self.aging_s = aging_s
        self._states: dict[str, _State] = {}
        self._group_cost: dict[tuple[Hashable, int], float] = {}  # (batch key, members) -> EWMA ms per member
        self._passes = 0

    # ------------------------------------------------------------------ state

    def guard(self, session_id: str) -> SloGuard:
        """The session's SLO guard (created on first use; a caller may pass its own with :meth:`adopt`)."""
        return self._state(session_id).guard

    def adopt(self, session_id: str, guard: SloGuard) -> None:
        """Use ``guard`` (the session's own, so ``Session.slo`` shows the switches) for ``session_id``."""
        self._state(session_id).guard = guard

    def knows(self, session_id: str) -> bool:
        """The scheduler has state for this session (it saw it, or :meth:`adopt` gave it its guard)."""
        return session_id in self._states

    def forget(self, session_id: str) -> None:
        """The session closed."""
        self._states.pop(session_id, None)

    def _state(self, session_id: str) -> _State:
        state = self._states.get(session_id)
        if state is None:
            state = self._states[session_id] = _State(
                SloGuard(wait_s=self.wait_s, recover_wait_s=self.recover_wait_s, recover_after_s=self.recover_after_s)
            )
        return state

    def drops(self, session_id: str) -> int:
        """Frames the scheduler told the loop to drop for this session so far."""
        return self._state(session_id).drops

    def misses(self, session_id: str) -> int:
        """Pushes planned after their frame's deadline so far."""
        return self._state(session_id).misses

    # ------------------------------------------------------------------ costs

    def observe(self, session_id: str, *, stream_batch: bool, push_ms: float) -> None:
        """One measured push of ``session_id`` in the given mode (alone, or its share of a shared forward)."""
        costs = self._state(session_id).cost_ms
        old = costs.get(stream_batch)
        costs[stream_batch] = push_ms if old is None else old + EWMA_ALPHA * (push_ms - old)

    def observe_group(self, batch_key: Hashable, members: int, forward_ms: float) -> None:
        """One shared forward of ``members`` sessions (or ``members == 1``: alone) of ``batch_key`` took
        ``forward_ms``: whether sharing pays is decided from these."""
        key = (batch_key, members)
        per_member = forward_ms / members
        old = self._group_cost.get(key)
        self._group_cost[key] = per_member if old is None else old + EWMA_ALPHA * (per_member - old)

    def cost_ms(self, session_id: str, stream_batch: bool) -> float:
        """Modelled ms of one push of the session in that mode (module docstring: Costs)."""
        costs = self._state(session_id).cost_ms
        if stream_batch in costs:
            return costs[stream_batch]
        if costs:
            return next(iter(costs.values()))
        known = [c for s in self._states.values() for c in s.cost_ms.values()]
        return sum(known) / len(known) if known else 0.0

    def utilisation(self, views: Sequence[SessionView], override: dict[str, bool] | None = None) -> float:
        """Modelled busy fraction of the device: Σ fps × ms per push / 1000 over the live sessions, each in its
        current mode (or the one ``override`` names)."""
        override = override or {}
        return sum(
            v.fps * self.cost_ms(v.session_id, override.get(v.session_id, v.stream_batch)) / 1e3
            for v in views
            if v.live
        )

    def _sharing_pays(self, key: Hashable, members: int) -> bool:
        shared = self._group_cost.get((key, members))
        alone = self._group_cost.get((key, 1))
        return shared is None or alone is None or shared < alone

    # ------------------------------------------------------------------ one pass

    def plan(self, now_ns: int, views: Sequence[SessionView]) -> Plan:
        """The pass to run now over ``views`` (module docstring, rules 1-5)."""
        self._passes += 1
        plan = Plan()
        waiting = [v for v in views if v.arrivals_ns]
        now_s = now_ns / 1e9

        # 2. Modes, from the oldest frame's wait (before any drop) and the modelled load
        modes = {v.session_id: v.stream_batch for v in views}
        for v in waiting:
            if not v.live:
                continue
            wait = (now_ns - v.arrivals_ns[0]) / 1e9
            load_allows = self.utilisation(views, {**modes, v.session_id: True}) <= self.max_utilisation
            switch = self.guard(v.session_id).observe(
                wait_s=wait, now_s=now_s, wants_stream_batch=v.wants_stream_batch, load_allows=load_allows
            )
            if switch is not None and switch != v.stream_batch:
                plan.switches[v.session_id] = switch
                modes[v.session_id] = switch

        # 6. Alignment of batching partners: drops that bring a session in step, holds for a partner's frame
        if self.batching:
            self._align(now_ns, views, plan)
            waiting = [
                v for v in waiting
                if v.session_id not in plan.held and plan.drops.get(v.session_id, 0) < len(v.arrivals_ns)
            ]  # fmt: skip

        # 3. Order: earliest (aged) deadline first, least recently served first on ties
        def key(v: SessionView) -> tuple[float, int]:
            state = self._state(v.session_id)
            # an offline session has no deadline: it sorts as if its frame had just arrived (live ones go first)
            since = v.arrivals_ns[0] if v.live else now_ns
            due = since / 1e9 + deadline_s(v.fps) - state.skips * self.aging_s
            return (due, state.last_pass)

        ordered = sorted(waiting, key=key)
        live_periods = [1.0 / v.fps for v in waiting if v.live]
        budget_ms = min(live_periods) * 1e3 if live_periods else math.inf

        # 5. Shared forwards: the first member of a group brings the compatible ones forward with it
        groups: list[list[SessionView]] = []
        placed: set[str] = set()
        for v in ordered:
            if v.session_id in placed:
                continue
            group = [v]
            placed.add(v.session_id)
            if self.batching and v.batch_key is not None and v.runs_chunk:
                mates = [
                    w for w in ordered
                    if w.session_id not in placed and w.runs_chunk and w.batch_key == v.batch_key
                ]  # fmt: skip
                if mates and self._sharing_pays(v.batch_key, 1 + len(mates)):
                    group += mates
                    placed.update(w.session_id for w in mates)
            groups.append(group)

        # 3./4. The pass budget, the predicted starts and the drops
        elapsed_ms = 0.0
        for group in groups:
            group_ms = sum(self.cost_ms(w.session_id, modes[w.session_id]) for w in group)
            if self.batching and len(group) > 1:
                shared = self._group_cost.get((group[0].batch_key, len(group)))
                if shared is not None:
                    group_ms = shared * len(group)
            if plan.groups and elapsed_ms + group_ms > budget_ms:
                plan.deferred.extend(w.session_id for w in group)
                continue
            start_ns = now_ns + int(elapsed_ms * 1e6)
            for w in group:
                state = self._state(w.session_id)
                aligning = plan.drops.get(w.session_id, 0)  # an alignment drop (rule 6) comes first
                w = replace(w, arrivals_ns=w.arrivals_ns[aligning:])
                late = self._drops(w, start_ns) if w.live else 0
                if late:
                    plan.drops[w.session_id] = aligning + late
                    state.drops += late
                kept = w.arrivals_ns[late]
                if w.live and start_ns > kept + int(deadline_s(w.fps) * 1e9):
                    plan.misses.append(w.session_id)
                    state.misses += 1
                state.skips = 0
                state.last_pass = self._passes
            plan.groups.append([w.session_id for w in group])
            elapsed_ms += group_ms
        for sid in plan.deferred:
            self._state(sid).skips += 1
        return plan

    def _align(self, now_ns: int, views: Sequence[SessionView], plan: Plan) -> None:
        """Rule 6 of the module docstring: fills ``plan.drops`` (alignment) and ``plan.held``."""
        for v in views:
            if v.arrivals_ns:
                self._state(v.session_id).last_arrival_ns = v.arrivals_ns[-1]
        partners: dict[tuple[Hashable, float], list[SessionView]] = {}
        for v in views:
            if v.live and v.batch_key is not None and v.frames_to_chunk is not None:
                partners.setdefault((v.batch_key, round(v.fps, 1)), []).append(v)
        now_s = now_ns / 1e9
        for (key, fps), group in partners.items():
            for v in group:  # a debt is paid from the frames the session holds, as they come
                state = self._state(v.session_id)
                if state.align_debt and v.arrivals_ns:
                    paid = min(state.align_debt, len(v.arrivals_ns))
                    plan.drops[v.session_id] = paid
                    state.align_debt -= paid
                    state.drops += paid
            if len(group) < 2 or not self._sharing_pays(key, len(group)):
                continue
            period_ns = int(1e9 / fps)

            def arrivals_to_chunk(v: SessionView) -> int:
                """Arrivals still needed before the frame of its next chunk is here (0: it is)."""
                held = len(v.arrivals_ns) - plan.drops.get(v.session_id, 0)
                return max(0, (v.frames_to_chunk or 0) + 1 - held + self._state(v.session_id).align_debt)

            need = {v.session_id: arrivals_to_chunk(v) for v in group}
            lead = min(group, key=lambda v: (need[v.session_id], v.session_id))
            for v in group:
                if v is lead:
                    continue
                offset = (need[v.session_id] - need[lead.session_id]) % CHUNK_FRAMES
                state = self._state(v.session_id)
                if offset in (2, 3) and now_s - state.aligned_at_s >= ALIGN_COOLDOWN_S:
                    state.align_debt += CHUNK_FRAMES - offset
                    state.aligned_at_s = now_s
                elif offset == 1 and need[lead.session_id] == 0 and lead.arrivals_ns:
                    # the partner's chunk frame is the next to arrive: hold the lead for it, at most a period
                    expected = (state.last_arrival_ns or now_ns) + period_ns
                    until = min(expected + period_ns // 4, lead.arrivals_ns[-1] + period_ns)
                    deadline = lead.arrivals_ns[0] + int(deadline_s(lead.fps) * 1e9)
                    cost_ns = int(self.cost_ms(lead.session_id, lead.stream_batch) * 1e6)
                    if now_ns < until and until + 2 * cost_ns < deadline:
                        plan.held[lead.session_id] = until

    def _drops(self, v: SessionView, start_ns: int) -> int:
        """How many of the oldest frames to drop: beyond the backlog, or unable to meet their deadline by
        ``start_ns``; the newest is always kept."""
        arrivals = v.arrivals_ns
        backlog = self.max_backlog or math.floor(deadline_s(v.fps) * v.fps) + 1
        drop = max(0, len(arrivals) - backlog)
        limit_ns = int(deadline_s(v.fps) * 1e9)
        while drop < len(arrivals) - 1 and start_ns > arrivals[drop] + limit_ns:
            drop += 1
        return drop
