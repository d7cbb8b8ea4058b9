"""The deadline scheduler against a model of step cost: a fake clock, sources at their fps, pushes that take the
modelled milliseconds. Deadlines are met where the modelled capacity allows, the SLO fallback and return happen at
the stated thresholds, drops are counted, no session starves and sessions share the device fairly."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest

from sdlive.daemon.server.scheduler import DeadlineScheduler, SessionView, deadline_s


@dataclass
class Source:
    """A modelled session: frames arrive every 1/fps; a push costs ``cost_ms[stream_batch]``."""

    sid: str
    fps: float
    cost_ms: dict[bool, float]
    wants_stream_batch: bool = False
    stream_batch: bool = False
    live: bool = True
    batch_key: object = None
    queue: deque[int] = field(default_factory=deque)
    next_arrival_ns: int = 0
    pushed: int = 0
    dropped: int = 0
    waits_s: list[float] = field(default_factory=list)
    pushed_at_s: list[float] = field(default_factory=list)

    def arrive(self, now_ns: int) -> None:
        while self.next_arrival_ns <= now_ns:
            self.queue.append(self.next_arrival_ns)
            self.next_arrival_ns += int(1e9 / self.fps)

    def view(self) -> SessionView:
        return SessionView(self.sid, self.fps, tuple(self.queue), live=self.live,
                           wants_stream_batch=self.wants_stream_batch, stream_batch=self.stream_batch,
                           batch_key=self.batch_key, runs_chunk=self.batch_key is not None)  # fmt: skip


def simulate(sources: list[Source], seconds: float, *, scheduler: DeadlineScheduler | None = None,
             shared_ms: float | None = None, idle_ms: float = 1.0, start_s: float = 0.0) -> DeadlineScheduler:  # fmt: skip
    """Run the scheduler over the modelled sources from ``start_s`` for ``seconds`` of fake time. ``shared_ms``:
    what one shared forward of a whole group costs (default: the sum of its members' costs)."""
    sched = scheduler or DeadlineScheduler()
    by_id = {s.sid: s for s in sources}
    now = int(start_s * 1e9)
    end = int((start_s + seconds) * 1e9)
    while now < end:
        for s in sources:
            s.arrive(now)
        plan = sched.plan(now, [s.view() for s in sources])
        for sid, stream_batch in plan.switches.items():
            by_id[sid].stream_batch = stream_batch
        for sid, n in plan.drops.items():
            for _ in range(n):
                by_id[sid].queue.popleft()
            by_id[sid].dropped += n
        if not plan.groups:
            now += int(idle_ms * 1e6)
            continue
        for group in plan.groups:
            members = [by_id[sid] for sid in group]
            costs = [m.cost_ms[m.stream_batch] for m in members]
            total = shared_ms if shared_ms is not None and len(group) > 1 else sum(costs)
            for m in members:
                arrival = m.queue.popleft()
                m.waits_s.append((now - arrival) / 1e9)
                m.pushed += 1
                m.pushed_at_s.append(now / 1e9)
                sched.observe(m.sid, stream_batch=m.stream_batch, push_ms=total / len(group))
            if members[0].batch_key is not None:
                sched.observe_group(members[0].batch_key, len(group), total)
            now += int(total * 1e6)
    return sched


def test_deadlines_are_met_without_a_drop_while_the_modelled_capacity_allows():
    # two 30 fps streams at 12 ms a push: 72 % of the device
    sources = [Source("a", 30, {False: 12.0}), Source("b", 30, {False: 12.0})]
    sched = simulate(sources, 20)
    for s in sources:
        assert s.dropped == 0 and sched.drops(s.sid) == 0
        assert sched.misses(s.sid) == 0
        assert s.pushed >= 30 * 20 - 2
        assert max(s.waits_s) < 1 / 30 + 0.025  # at most a frame period plus the other's push


def test_an_overloaded_device_drops_frames_rather_than_drift_and_counts_every_drop():
    # two 30 fps streams at 25 ms a push: 150 % of the device
    sources = [Source("a", 30, {False: 25.0}), Source("b", 30, {False: 25.0})]
    sched = simulate(sources, 20)
    for s in sources:
        assert s.dropped > 100
        assert sched.drops(s.sid) == s.dropped  # every drop counted
        assert s.pushed + s.dropped + len(s.queue) == 30 * 20  # every frame accounted for
        # no drift: the waits of the last seconds are no worse than the deadline allows
        late = s.waits_s[len(s.waits_s) // 2 :]
        assert max(late) <= deadline_s(30) + 0.06
        # the device works at capacity: it pushes as many frames as fit
        assert s.pushed == pytest.approx(20 * 1000 / 50, rel=0.1)


def test_the_oldest_frame_waiting_half_a_second_falls_back_to_no_batch_and_load_brings_it_back():
    # stream batch costs 40 ms a push at 30 fps (overloaded), no-batch 20 ms
    src = Source("a", 30, {True: 40.0, False: 20.0}, wants_stream_batch=True, stream_batch=True)
    sched = DeadlineScheduler()
    simulate([src], 4, scheduler=sched)
    assert src.stream_batch is False, "frames waited >= 0.5 s: no-batch mode"
    assert sched.guard("a").switches == 1
    # it fell back at the first push whose frame had waited 0.5 s, not before: the pushes till then were 40 ms apart
    first = next(i for i, w in enumerate(src.waits_s) if w >= 0.5 - 1e-6)
    assert src.pushed_at_s[first - 1] - src.pushed_at_s[first - 2] == pytest.approx(0.040)
    assert src.pushed_at_s[first + 1] - src.pushed_at_s[first] == pytest.approx(0.020)
    assert src.dropped == 0  # the fallback acted before any frame missed its deadline
    # stream batch would still overload the device (40 ms x 30 fps): it stays in no-batch mode despite calm waits
    simulate([src], 10, scheduler=sched, start_s=4)
    assert src.stream_batch is False and sched.guard("a").switches == 1
    # the stream batch gets cheaper (a lighter scene): it returns at once, the waits having been calm for 5 s
    for _ in range(20):
        sched.observe("a", stream_batch=True, push_ms=10.0)
    src.cost_ms[True] = 10.0
    simulate([src], 0.1, scheduler=sched, start_s=14)
    assert src.stream_batch is True and sched.guard("a").switches == 2
    # overloaded again in stream batch: falls back; a calm period shorter than 5 s does not bring it back
    src.cost_ms[True] = 60.0
    simulate([src], 4, scheduler=sched, start_s=14.1)
    assert src.stream_batch is False and sched.guard("a").switches == 3
    for _ in range(20):
        sched.observe("a", stream_batch=True, push_ms=10.0)
    src.cost_ms[True] = 10.0
    t = 18.1
    while src.stream_batch is False and t < 30:
        simulate([src], 0.05, scheduler=sched, start_s=t)
        t += 0.05
    assert src.stream_batch is True and sched.guard("a").switches == 4
    # it came back 5 s after the first push of its calm period (waits under 0.25 s), not earlier
    back = len(src.waits_s) - 1
    while src.waits_s[back - 1] < 0.25:
        back -= 1
    calm_from = src.pushed_at_s[back]
    assert 5.0 <= t - calm_from <= 5.2


def test_a_slow_stream_next_to_a_busy_one_never_starves():
    # "busy" needs 85 % of the device; "slow" sends a frame a second and costs more than the pass budget
    busy = Source("busy", 60, {False: 14.0})
    slow = Source("slow", 1, {False: 30.0})
    other = Source("other", 30, {False: 1.0})
    simulate([busy, slow, other], 20)
    assert slow.pushed >= 19
    assert max(slow.waits_s) < deadline_s(1)  # every frame served before its deadline
    gaps = [b - a for a, b in zip(slow.pushed_at_s, slow.pushed_at_s[1:], strict=False)]
    assert max(gaps) < 2.5


def test_overloaded_sessions_share_the_device_fairly():
    sources = [Source(f"s{i}", 30, {False: 20.0}) for i in range(3)]  # 180 % of the device
    simulate(sources, 15)
    counts = [s.pushed for s in sources]
    assert max(counts) - min(counts) <= 2, counts
    assert sum(counts) == pytest.approx(15 * 1000 / 20, rel=0.05)


def test_compatible_sessions_share_a_forward_until_sharing_stops_paying():
    sched = DeadlineScheduler()
    views = [
        SessionView("a", 30, (0,), batch_key="64x64", runs_chunk=True),
        SessionView("b", 30, (0,), batch_key="64x64", runs_chunk=True),
        SessionView("c", 30, (0,), batch_key="128x128", runs_chunk=True),
        SessionView("d", 30, (0,), batch_key="64x64", runs_chunk=False),  # only buffers a frame: alone
    ]
    plan = sched.plan(0, views)
    assert sorted(map(sorted, plan.groups)) == [["a", "b"], ["c"], ["d"]]
    # measured: a shared forward of two costs 30 ms per member, alone 20 ms: sharing stops
    sched.observe_group("64x64", 2, 60.0)
    sched.observe_group("64x64", 1, 20.0)
    plan = sched.plan(1, views)
    assert all(len(g) == 1 for g in plan.groups)
    assert not DeadlineScheduler(batching=False).plan(0, views).groups[0][1:]


def test_batched_sessions_meet_deadlines_that_one_by_one_they_miss():
    # four 30 fps streams at 12 ms each alone (144 %), one shared forward of all four costs 16 ms
    alone = [Source(f"s{i}", 30, {False: 12.0}, batch_key="k") for i in range(4)]
    simulate(alone, 10, scheduler=DeadlineScheduler(batching=False))
    together = [Source(f"s{i}", 30, {False: 12.0}, batch_key="k") for i in range(4)]
    simulate(together, 10, shared_ms=16.0)
    assert sum(s.dropped for s in alone) > 200
    assert sum(s.dropped for s in together) == 0


def test_offline_sessions_never_drop_and_are_not_starved_by_live_ones():
    live = Source("live", 30, {False: 30.0})  # 90 % of the device
    offline = Source("render", 1000, {False: 5.0}, live=False)
    simulate([live, offline], 5)
    assert offline.dropped == 0
    assert offline.pushed > 50


@dataclass
class Chunked:
    """A modelled session whose every fourth push runs a chunk (``chunk_ms``); the others only buffer a frame."""

    sid: str
    fps: float
    start_ns: int
    chunk_ms: float = 20.0
    queue: deque[int] = field(default_factory=deque)
    pushes: int = 0
    dropped: int = 0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (time s, sessions sharing the forward)
    waits_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.next_arrival_ns = self.start_ns

    def arrive(self, now_ns: int) -> None:
        while self.next_arrival_ns <= now_ns:
            self.queue.append(self.next_arrival_ns)
            self.next_arrival_ns += int(1e9 / self.fps)

    def view(self) -> SessionView:
        to_chunk = 3 - self.pushes % 4
        return SessionView(self.sid, self.fps, tuple(self.queue), batch_key="64x64", runs_chunk=to_chunk == 0,
                           frames_to_chunk=to_chunk)  # fmt: skip


def simulate_chunks(sources: list[Chunked], seconds: float, *, shared_ms: float = 24.0) -> DeadlineScheduler:
    """Sources whose chunks cost ``chunk_ms`` alone and ``shared_ms`` for one forward shared by several."""
    sched = DeadlineScheduler()
    by_id = {s.sid: s for s in sources}
    now, end = 0, int(seconds * 1e9)
    while now < end:
        for s in sources:
            s.arrive(now)
        plan = sched.plan(now, [s.view() for s in sources if s.start_ns <= now])
        for sid, n in plan.drops.items():
            for _ in range(n):
                by_id[sid].queue.popleft()
            by_id[sid].dropped += n
        spent = 0.0
        for group in plan.groups:
            members = [by_id[sid] for sid in group]
            chunk = [m for m in members if m.pushes % 4 == 3]
            cost = (shared_ms if len(chunk) > 1 else members[0].chunk_ms) if chunk else 0.1
            for m in members:
                m.waits_s.append((now - m.queue.popleft()) / 1e9)
                if m.pushes % 4 == 3:
                    m.chunks.append((now / 1e9, len(chunk)))
                m.pushes += 1
                sched.observe(m.sid, stream_batch=False, push_ms=cost / len(members))
            if chunk:
                sched.observe_group("64x64", len(chunk), cost)
            spent += cost
        now += int(max(spent, 0.5) * 1e6)
    return sched


@pytest.mark.parametrize("offset_frames", [1, 2, 3])
def test_partners_two_or_three_frames_off_are_brought_in_step_once_and_then_share_every_chunk(offset_frames):
    period = int(1e9 / 30)
    a = Chunked("a", 30, 0)
    b = Chunked("b", 30, offset_frames * period + period // 3)  # frames off, and not in step within a frame either
    simulate_chunks([a, b], 12)
    assert a.dropped + b.dropped <= 3, "at most one alignment, of at most 3 frames"
    late = [n for t, n in a.chunks + b.chunks if t > 4]
    assert late and all(n == 2 for n in late), "in step: every chunk in one shared forward"
    # holding a chunk for the partner's frame costs at most a frame period of waiting
    assert max(a.waits_s[len(a.waits_s) // 2 :] + b.waits_s[len(b.waits_s) // 2 :]) < 2.2 / 30


def test_no_hold_or_alignment_for_sessions_that_cannot_share():
    a = Chunked("a", 30, 0)
    b = Chunked("b", 24, 1000)  # another fps: never in step
    simulate_chunks([a, b], 5)
    assert a.dropped == b.dropped == 0
    assert max(a.waits_s) < 1.1 / 24 + 0.03
