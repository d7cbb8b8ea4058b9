"""The deadline scheduler in a real daemon process: a session fed faster than the tiny model can restyle drops frames
rather than drift (counted in ``status`` and shown by `sdlive status`), falls back to no-batch mode, and a source
whose frames arrive already late counts its misses."""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np

SIZE = 128
FPS = 120.0  # far beyond what the tiny model restyles on a CPU at 128x128


def feed(session, seconds: float, *, lag_s: float = 0.0) -> int:
    """Send frames at FPS for ``seconds``, captured ``lag_s`` ago; returns how many were sent."""
    sent = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        frame = np.full((SIZE, SIZE, 3), (7 * sent) % 256, np.uint8)
        session.send(frame, timestamp_ns=time.monotonic_ns() - int(lag_s * 1e9))
        sent += 1
        while session.recv(timeout_s=0) is not None:
            pass
        time.sleep(max(0.0, start + sent / FPS - time.monotonic()))
    return sent


def test_an_overloaded_session_counts_drops_and_misses_in_status(daemon_factory, sdlive_command, wait_for):
    # rings of 64 slots: the backlog reaches the daemon instead of being dropped by a 4-slot ring (dropped_in)
    daemon = daemon_factory("--ring-slots", "64")
    with daemon.client() as client:
        params = {"steps": 2, "stream_batch": True}
        with client.open_session(width=SIZE, height=SIZE, fps=FPS, params=params, client="overload") as session:
            sent = feed(session, 4.5)
            assert wait_for(lambda: session.status().dropped_late > 0, timeout_s=20)
            status = session.status()
            table = subprocess.run(sdlive_command("status", "--address", daemon.control_address, "--timeout", "30"),
                                   capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})  # fmt: skip
            after = session.status()
        # frames captured a second before they reach the daemon are past their deadline on arrival
        with client.open_session(width=SIZE, height=SIZE, fps=30, client="lagging") as lagging:
            feed_lagging = 0
            start = time.monotonic()
            while time.monotonic() - start < 3.0:
                lagging.send(np.full((SIZE, SIZE, 3), 40, np.uint8), timestamp_ns=time.monotonic_ns() - 1_500_000_000)
                feed_lagging += 1
                time.sleep(1 / 30)
            assert wait_for(lambda: lagging.status().late_in > 0, timeout_s=20)
            late = lagging.status()

    # drops rather than drift: far fewer frames restyled than sent, every missing one counted somewhere
    assert status.frames_in < sent
    assert status.dropped_late > 0
    assert status.frames_in + status.dropped_late + status.dropped_in <= sent
    assert status.slo_switches >= 1 and status.mode == "no_batch", "waits >= 0.5 s: no-batch mode"
    assert late.late_in > 0 and late.late_in <= late.frames_in

    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    assert "sched drop/miss" in text and "mode" in text and "sched drop/miss: inputs the deadline scheduler" in text
    # the row's "sched drop/miss" column (after "late") holds the counts between the two status replies
    row = next(line for line in table.stdout.splitlines() if status.session_id in line).split()
    drops, misses = map(int, row[12].split("/"))
    assert status.dropped_late <= drops <= after.dropped_late and status.late_in <= misses <= after.late_in, row
    assert row[13] == "nb", row


def test_sessions_of_one_size_fed_together_share_forwards_in_the_daemon(daemon_factory, wait_for):
    daemon = daemon_factory()
    with daemon.client() as client:
        opened = [client.open_session(width=64, height=64, fps=15, client=f"pair-{i}") for i in range(2)]
        try:
            # the second source starts two frames later: its chunks are off-phase until the scheduler aligns them
            for i in range(42):
                for k, session in enumerate(opened):
                    if i >= 2 * k and i - 2 * k < 40:
                        frame = np.full((64, 64, 3), (9 * i) % 256, np.uint8)
                        session.send(frame, timestamp_ns=time.monotonic_ns())
                for session in opened:
                    while session.recv(timeout_s=0) is not None:
                        pass
                time.sleep(1 / 15)
            assert wait_for(lambda: all(s.status().frames_in + s.status().dropped_late >= 40 for s in opened), 30)
            stats = [s.status() for s in opened]
        finally:
            for session in opened:
                session.close()
    # brought in step once (at most 3 frames dropped), the chunks of both ran through shared DiT forwards
    assert sum(s.dropped_late for s in stats) <= 3
    for s in stats:
        assert s.shared_chunks >= 3, (s.shared_chunks, s.engine_frames_in)
        assert s.late_in == 0
