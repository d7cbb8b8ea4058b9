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


def test_due_times_never_go_backwards_and_never_burst():
    _, dues, lates = simulate(fps=30, chunk=4, compute_ms=40, frames=80, first_extra_ms=900)
    gaps = np.diff(dues)
    assert (gaps > 0).all()
    assert gaps.min() >= int(1e9 / 30) // 2 - 1, "catching up may go at most twice the source rate"
    assert not lates[0], "the first output sets the latency target: not a miss"


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
