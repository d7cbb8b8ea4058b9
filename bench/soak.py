"""Soak: a tiny-model daemon serving several sessions for minutes, over shared memory and the network, watched for
leaks, crashes and lost frames.

    python bench/soak.py --minutes 10 --sessions 4 --json out/soak.json

It starts its own daemon (``--model tiny --device cpu``) and runs ``--sessions`` client threads with the real client
library: even ones over shared memory, odd ones over the network (every second network one sends JPEG). Each
thread streams ``--size`` frames at ``--fps`` in rounds of ``--round-s`` seconds: open a session, stream, stop,
drain the outputs, read the daemon's figures for it, close it; then the next round (so opening and closing are
soaked too). Every ``--interval-s`` the daemon process is sampled: RSS, open file descriptors, threads, and the
ring files in the ring folder.

Reported (JSON keys):

* ``rss_slope_mb_per_min``, ``fd_slope`` (per minute), ``thread_slope``, ``ring_file_slope``: least-squares
  slopes of the samples taken while the sessions stream, after the first round (warm-up), with ``*_noise`` (the residual standard deviation) and
  ``flat`` (each drift over the run within three times its noise, or within 8 MB / 2 fds / 1 thread / 2 files).
* ``after_close`` vs ``before_sessions``: the same figures once every session is closed (ring files back to 0,
  descriptors back to where they started).
* ``crashes``: the daemon exiting or failing to stop cleanly, and any client thread dying of an exception.
* ``accounted``: for every session of every round, at close, ``sent == received + dropped_in + dropped_out +
  in_flight`` where ``in_flight`` is exactly what the engine still holds (``engine_frames_in -
  engine_frames_out``: the frames of its pipeline depth, which a stopped stream never flushes). ``dropped_in``
  counts the daemon's input drops plus the client's own (a network send the socket refused);
  ``dropped_out`` the daemon's output drops (pacer lane, socket or output ring overrun).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import moving_shapes, parse_size, report, stamp  # noqa: E402
from pacing import start_daemon  # noqa: E402

from sdlive.daemon.protocol.ring import ring_path  # noqa: E402
from sdlive.obs_bridge.client import DaemonClient  # noqa: E402

DRAIN_QUIET_S = 3.0
"""A round's outputs are drained once none came for this long after the last input."""


def proc_sample(pid: int) -> dict[str, float]:
    """RSS (MB), open fds and threads of ``pid``, and the ring files in the ring folder that ``pid`` created (other
    daemons on the machine have theirs there too)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    folder = os.path.dirname(ring_path("probe"))
    rings = 0
    for name in os.listdir(folder):
        if not re.match(r"^sdlive-[A-Za-z0-9_-]+-(in|out)$", name):
            continue
        try:  # the header's creator_pid (offset 36), read through the descriptor: never a mapped load
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                head = os.pread(fd, 40, 0)
            finally:
                os.close(fd)
        except OSError:
            continue
        rings += len(head) == 40 and struct.unpack_from("<I", head, 36)[0] == pid & 0xFFFFFFFF
    return {"rss_mb": rss_kb / 1024, "fds": fds, "threads": threads, "ring_files": rings}


class Worker(threading.Thread):
    """One client: rounds of open → stream → drain → account → close."""

    def __init__(self, index: int, control: str, args: argparse.Namespace, clip: np.ndarray, stop: threading.Event):
        super().__init__(name=f"soak-{index}", daemon=True)
        self.index = index
        self.control = control
        self.args = args
        self.clip = clip
        self.stop_event = stop
        self.transport = "shm" if index % 2 == 0 else "net"
        self.jpeg = 80 if index % 4 == 3 else None
        self.rounds: list[dict[str, Any]] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            with DaemonClient(self.control, timeout_s=30.0) as client:
                while not self.stop_event.is_set():
                    self.rounds.append(self._round(client))
        except Exception:  # noqa: BLE001 - reported as a crash
            self.error = traceback.format_exc()

    def _round(self, client: DaemonClient) -> dict[str, Any]:
        width, height = self.args.size
        session = client.open_session(width=width, height=height, fps=self.args.fps, transport=self.transport,
                                      jpeg_quality=self.jpeg, client=f"soak-{self.index}")  # fmt: skip
        try:
            period = 1.0 / self.args.fps
            ends = time.monotonic() + self.args.round_s
            next_t = time.monotonic()
            i = 0
            while time.monotonic() < ends and not self.stop_event.is_set():
                # Shared memory: never lap the daemon (a client that replays a file waits the same way).
                if self.transport == "shm" and (session.pending_inputs or 0) >= (session.input_slots or 4) - 1:
                    session.recv(timeout_s=0.005)
                    continue
                session.send(self.clip[i % len(self.clip)])
                i += 1
                next_t += period
                while (wait := next_t - time.monotonic()) > 0:
                    session.recv(timeout_s=min(wait, 0.02))
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < DRAIN_QUIET_S:
                if session.recv(timeout_s=0.1) is not None:
                    quiet_since = time.monotonic()
            stats = session.status()
            # The client library counts a network send its socket refused (NOBLOCK, live video) in frames_sent;
            # it has no public counter for those yet, so it is read here (obs_bridge/client.py: _send_dropped).
            client_dropped = int(getattr(session, "_send_dropped", 0))
            sent, received = session.frames_sent, session.frames_received
            dropped_in = stats.dropped_in + client_dropped
            dropped_out = stats.dropped_out
            in_flight = sent - received - dropped_in - dropped_out
            engine_holds = stats.engine_frames_in - stats.engine_frames_out
            return {
                "transport": self.transport + ("/jpeg" if self.jpeg else ""),
                "session_id": session.session_id,
                "sent": sent,
                "received": received,
                "dropped_in": dropped_in,
                "dropped_out": dropped_out,
                "in_flight": in_flight,
                "engine_holds": engine_holds,
                "accounted": in_flight == engine_holds and stats.frames_in == stats.engine_frames_in,
            }
        finally:
            session.close()


def slope_per_min(times_s: list[float], values: list[float]) -> tuple[float, float]:
    """(least-squares slope per minute, residual standard deviation)."""
    if len(times_s) < 3:
        return float("nan"), float("nan")
    t = np.asarray(times_s) / 60.0
    v = np.asarray(values, dtype=np.float64)
    slope, intercept = np.polyfit(t, v, 1)
    residual = v - (slope * t + intercept)
    return float(slope), float(residual.std())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--size", type=parse_size, default=(64, 64))
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument("--round-s", type=float, default=60.0, help="seconds each session streams before reopening")
    parser.add_argument("--interval-s", type=float, default=10.0, help="seconds between process samples")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    width, height = args.size
    clip = moving_shapes(width, height, 48, channels=3)
    workdir = Path(tempfile.mkdtemp(prefix="sdlive-soak-"))
    proc, control = start_daemon(workdir / "daemon.log")  # returns once its model is loaded
    stop = threading.Event()
    workers = [Worker(i, control, args, clip, stop) for i in range(args.sessions)]
    samples: list[dict[str, float]] = []
    after_close: dict[str, float] = {}
    crashes: list[str] = []
    started = time.monotonic()
    try:
        for w in workers:
            w.start()
        ends = started + args.minutes * 60
        next_sample = started
        while time.monotonic() < ends:
            if proc.poll() is not None:
                crashes.append(f"the daemon exited with {proc.returncode} mid-run")
                break
            if time.monotonic() >= next_sample:
                samples.append({"t_s": round(time.monotonic() - started, 1), **proc_sample(proc.pid)})
                print(f"[{samples[-1]['t_s']:6.0f} s] " + "  ".join(f"{k} {v:g}" for k, v in samples[-1].items()
                                                                   if k != "t_s"), flush=True)  # fmt: skip
                next_sample += args.interval_s
            time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join(args.round_s + 120)
            if w.is_alive():
                crashes.append(f"client {w.index} did not finish its last round")
            if w.error:
                crashes.append(f"client {w.index} failed:\n{w.error}")
        if proc.poll() is None:
            time.sleep(1.0)  # the last close_session replies are out; the daemon has let go of their rings
            after_close = proc_sample(proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(10)
                crashes.append("the daemon did not stop within 30 s of SIGTERM")
            if code != 0:
                crashes.append(f"the daemon exited with {code} on SIGTERM")
        elif not any("exited" in c for c in crashes):
            crashes.append(f"the daemon exited with {proc.returncode}")

    steady = [s for s in samples if s["t_s"] >= min(args.round_s, args.minutes * 30)] or samples
    times = [s["t_s"] for s in steady]
    slopes: dict[str, Any] = {}
    flat: dict[str, bool] = {}
    duration_min = (times[-1] - times[0]) / 60 if len(times) > 1 else 0.0
    for key, name, floor in (("rss_mb", "rss_slope_mb_per_min", 8.0), ("fds", "fd_slope", 2.0),
                             ("threads", "thread_slope", 1.0), ("ring_files", "ring_file_slope", 2.0)):  # fmt: skip
        slope, noise = slope_per_min(times, [s[key] for s in steady])
        slopes[name] = round(slope, 4)
        slopes[name.replace("slope", "noise")] = round(noise, 4)
        flat[key] = bool(abs(slope * duration_min) <= max(3 * noise, floor)) if slope == slope else False
    rounds = [r for w in workers for r in w.rounds]
    accounted = bool(rounds) and all(r["accounted"] for r in rounds)
    totals = {k: sum(r[k] for r in rounds) for k in ("sent", "received", "dropped_in", "dropped_out", "in_flight")}
    result = {
        **stamp(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "minutes": args.minutes,
        "sessions": args.sessions,
        "size": f"{width}x{height}",
        "fps": args.fps,
        "crashes": len(crashes),
        "crash_reasons": crashes,
        **slopes,
        "flat": flat,
        "accounted": accounted,
        "rounds": len(rounds),
        "totals": totals,
        "per_round": rounds,
        "samples": samples,
        "after_close": after_close,
        "before_sessions": samples[0] if samples else {},
        "daemon_log": str(workdir / "daemon.log"),
    }
    rows = [("crashes", len(crashes)), ("rounds (sessions opened and closed)", len(rounds)),
            ("frames sent / received", f"{totals['sent']} / {totals['received']}"),
            ("dropped in / out, in flight at close", f"{totals['dropped_in']} / {totals['dropped_out']}, "
                                                     f"{totals['in_flight']}"),
            ("accounted (every round)", accounted)]  # fmt: skip
    rows += [(name, slopes[name]) for name in ("rss_slope_mb_per_min", "fd_slope", "thread_slope", "ring_file_slope")]
    rows += [("flat (rss, fds, threads, rings)", " ".join("yes" if flat[k] else "NO" for k in flat))]
    if after_close and samples:
        rows += [("fds / ring files before sessions, after all closed",
                  f"{samples[0]['fds']:g} / {samples[0]['ring_files']:g}, "
                  f"{after_close['fds']:g} / {after_close['ring_files']:g}")]  # fmt: skip
    report(f"sdlive soak: {args.sessions} sessions, {args.minutes:g} min", rows, result, args.json)
    if crashes:
        print("\n".join(crashes), file=sys.stderr)
    sys.exit(1 if crashes or not accounted else 0)


if __name__ == "__main__":
    main()
