"""Output pacing: bursty engine output leaves at the source rate with a steady latency; late frames are counted and
never burst; the output thread releases at due times."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sdlive.daemon.server.pacing import OutputThread, Pacer

MS = 1_000_000


def simulate(fps: float, chunk: int, compute_ms: float, frames: int, first_extra_ms: float = 0.0):
    """Inputs arrive every 1/fps; the engine returns `chunk` outputs at once after each chunk's compute time."""
    pacer = Pacer(fps)
    period = int(1e9 / fps)
    dues, lates = [], []
    for start in range(0, frames, chunk):
        last_arrival = (start + chunk - 1) * period
        ready = last_arrival + int(compute_ms * MS) + (int(first_extra_ms * MS) if start == 0 else 0)
        for k in range(start, start + chunk):
            due, late = pacer.schedule(arrival_ns=k * period, ready_ns=ready)
            dues.append(due)
            lates.append(late)
    return pacer, np.asarray(dues), lates


def test_bursts_leave_evenly_at_the_source_rate():
    pacer, dues, lates = simulate(fps=30, chunk=4, compute_ms=40, frames=240)
    steady = np.diff(dues[40:]) / MS
    assert np.allclose(steady, 1000 / 30, atol=0.5), "outputs of a chunk must be spread one period apart"
    assert not any(lates[40:])
    # latency settles just above what the engine needs (last frame of a chunk waits 3 periods + compute)
    needed_ms = 3 * 1000 / 30 + 40
    assert needed_ms <= pacer.target_latency_ms <= needed_ms + 20


def test_due_times_never_go_backwards():
    _, dues, lates = simulate(fps=30, chunk=4, compute_ms=40, frames=80, first_extra_ms=900)
    assert (np.diff(dues) >= 0).all()
    assert not lates[0], "the first output sets the latency target: not a miss"


class Item:
    """An output as the output thread sees one: a lane gap, a queue limit, a drop callback."""

    def __init__(self, name, gap_ns=0, queue_limit=8, drops=None):
        self.name, self.gap_ns, self.queue_limit, self._drops = name, gap_ns, queue_limit, drops

    def dropped(self):
        self._drops.append(self.name)


def run_thread(items_with_due, expect: int, timeout_s: float = 10.0):
    """Submit (key, item, due_ns) in one go (under the thread's lock: none leaves before all are in); return
    [(name, released_ns)] once ``expect`` items left."""
    released, done = [], threading.Event()

    def release(item):
        released.append((item.name, time.monotonic_ns()))
        if len(released) == expect:
            done.set()

    thread = OutputThread(release)
    thread.start()
    try:
        with thread.lock:
            for key, item, due in items_with_due:
                thread.submit(key, item, due)
        assert done.wait(timeout_s), f"only {len(released)} of {expect} released"
        time.sleep(0.05)  # nothing more may come
    finally:
        thread.stop()
    return released, thread


def test_a_backlog_drains_at_no_more_than_twice_the_source_rate():
    """A chunk that is late has all its outputs due at once: they leave half a period apart, not in a burst."""
    period = 20 * MS
    now = time.monotonic_ns()
    released, thread = run_thread([("s", Item(i, gap_ns=period // 2), now + 10 * MS) for i in range(4)], expect=4)
    assert [name for name, _ in released] == [0, 1, 2, 3] and thread.dropped == 0
    gaps = np.diff([at for _, at in released])
    assert gaps.min() >= period // 2 - MS, gaps / MS


def test_a_source_faster_than_its_declared_fps_drops_the_oldest_waiting_outputs_and_counts_them():
    """Declared 10 fps (gap 50 ms), outputs every 5 ms: the lane stays at its limit, the oldest waiting output is
    dropped each time (counted through ``dropped()``), and latency stays bounded instead of drifting."""
    gap, limit, drops = 50 * MS, 3, []
    now = time.monotonic_ns()
    items = [("s", Item(i, gap_ns=gap, queue_limit=limit, drops=drops), now + 5 * MS * i) for i in range(40)]
    released, thread = run_thread(items, expect=limit, timeout_s=10)
    names = [name for name, _ in released]
    assert names == [37, 38, 39], names  # all submitted at once: only the newest survive
    assert len(drops) == 40 - len(names) == thread.dropped
    assert sorted(drops + names) == list(range(40)), "every output is either released or counted as dropped"


def test_lanes_are_independent():
    """One session's full lane drops only its own outputs."""
    drops = []
    now = time.monotonic_ns()
    items = [("fast", Item(f"f{i}", gap_ns=100 * MS, queue_limit=2, drops=drops), now) for i in range(10)]
    items += [("calm", Item(f"c{i}", drops=drops), now + i * MS) for i in range(5)]
    released, _ = run_thread(items, expect=7)
    assert [n for n, _ in released if n.startswith("c")] == [f"c{i}" for i in range(5)]
    assert [n for n, _ in released if n.startswith("f")] == ["f8", "f9"]
    assert all(d.startswith("f") for d in drops) and len(drops) == 8


def test_a_hitch_mid_stream_counts_as_deadline_misses():
    pacer = Pacer(30)
    period = int(1e9 / 30)
    lates = []
    for start in range(0, 120, 4):
        extra = 300 * MS if start == 80 else 0
        ready = (start + 3) * period + 40 * MS + extra
        lates += [pacer.schedule(arrival_ns=k * period, ready_ns=ready)[1] for k in range(start, start + 4)]
    assert any(lates[80:84]) and not any(lates[40:80])


def test_latency_target_relaxes_after_a_hitch():
    pacer = Pacer(30)
    period = int(1e9 / 30)
    pacer.schedule(arrival_ns=0, ready_ns=500 * MS)  # one very late frame
    high = pacer.target_latency_ms
    for k in range(1, 400):
        pacer.schedule(arrival_ns=k * period, ready_ns=k * period + 20 * MS)
    assert pacer.target_latency_ms < high / 4


def test_bad_fps_is_rejected():
    with pytest.raises(ValueError, match="fps"):
        Pacer(0)


def test_output_thread_releases_in_due_order_at_due_times():
    released: list[tuple[str, int]] = []
    done = threading.Event()

    def release(item):
        released.append((item, time.monotonic_ns()))
        if len(released) == 4:
            done.set()

    thread = OutputThread(release)
    thread.start()
    try:
        now = time.monotonic_ns()
        thread.submit("s1", "c", now + 150 * MS)
        thread.submit("s1", "a", now + 50 * MS)
        thread.submit("s2", "b", now + 100 * MS)
        thread.submit("s2", "gone", now + 120 * MS)
        thread.submit("s1", "d", now + 200 * MS)
        assert thread.forget("s2") == 2
        thread.submit("s2", "b", now + 100 * MS)
        assert done.wait(5)
        assert [name for name, _ in released] == ["a", "b", "c", "d"]
        for (_, at), due_ms in zip(released, (50, 100, 150, 200), strict=True):
            assert at >= now + due_ms * MS - 2 * MS, "released before its due time"
    finally:
        thread.stop()
    assert not thread.is_alive()


def test_an_offline_session_runs_at_the_models_speed_with_every_frame_in_order(daemon):
    """Declared 1 fps, offline: live pacing would hold each output half a second apart (>= 19.5 s for 40), offline
    releases each as soon as it is ready and drops none; the client paces itself by the ring (pending_inputs)."""
    frames, size = 40, 64
    with daemon.client() as client:
        with client.open_session(width=size, height=size, fps=1, transport="shm", pacing="offline") as session:
            assert session.info.pacing == "offline"
            got, started = [], time.monotonic()
            for i in range(frames):
                while (session.pending_inputs or 0) >= 2:  # the client's flow control: never lap the daemon
                    if (out := session.recv(timeout_s=0.01)) is not None:
                        got.append(out)
                session.send(np.full((size, size, 3), (5 * i) % 256, np.uint8), timestamp_ns=1000 + i)
            expected = frames - session.latency_frames
            deadline = time.monotonic() + 60
            while len(got) < expected and time.monotonic() < deadline:
                if (out := session.recv(timeout_s=0.2)) is not None:
                    got.append(out)
            elapsed = time.monotonic() - started
            stats = session.status()
    assert [f.timestamp_ns for f in got] == [1000 + i for i in range(len(got))] and len(got) >= expected
    assert stats.dropped_in == 0 and stats.dropped_out == 0, stats
    assert elapsed < 15, f"offline took {elapsed:.1f} s for {frames} frames: it is still paced"


def test_a_lane_holds_what_the_latency_target_holds_back_and_no_more_than_its_cap():
    from sdlive.daemon.server.pacing import DEFAULT_QUEUE_LIMIT, MAX_QUEUE_LIMIT, queue_limit

    assert queue_limit(0, 30) == DEFAULT_QUEUE_LIMIT + 1
    assert queue_limit(500 * MS, 30) == 16 + DEFAULT_QUEUE_LIMIT  # 15 outputs wait out half a second at 30 fps
    assert queue_limit(10_000 * MS, 60) == MAX_QUEUE_LIMIT
    assert queue_limit(10_000 * MS, 1) == DEFAULT_QUEUE_LIMIT + 11
