"""Pacing benchmark: how evenly restyled frames leave the daemon, and how steady their latency is.

    python bench/pacing.py --seconds 10 --json out/pacing.json            # starts a tiny-model CPU daemon
    python bench/pacing.py --daemon tcp://127.0.0.1:5557 --size 512x512   # against a running daemon

A client sends frames at ``--fps`` with real capture timestamps over shared memory and times every output it gets.
The engine gives outputs four at a time; the daemon's pacer spreads them to the source rate. Reported, over the
steady part of the run (after the first third, once the latency target has settled):

* ``output_interval_ms_mean`` / ``_std``: client-side intervals between outputs (the target is 1000 / fps);
  ``interval_error_ratio`` = |mean − target| / target.
* ``daemon_jitter_ms``: the daemon's own figure (standard deviation of its output intervals, from ``status``).
* ``latency_ms_p50`` / ``_p95`` / ``_p99`` and ``latency_spread_ms`` (p95 − p50): capture to output, end to end.

These are wall-clock figures of a noisy machine: the suite checks pacing's logic, this measures it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import moving_shapes, parse_size, percentile, report, stamp  # noqa: E402

from sdlive.obs_bridge.client import DaemonClient, DaemonUnavailable  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_daemon(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    control = f"tcp://127.0.0.1:{free_port()}"
    pub = f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "sdlive.daemon.server", "--model", "tiny", "--device", "cpu", "--no-ui",
           "--control", control, "--pub", pub]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with DaemonClient(control, timeout_s=2.0) as client:
                # It answers while its model loads (state "loading"): sessions can open once it is "ready".
                while getattr(client.status(), "state", "ready") != "ready":
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the daemon did not become ready; see {log}")
                    time.sleep(0.5)
            return proc, control
        except DaemonUnavailable:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited ({proc.returncode}); see {log}") from None
    proc.kill()
    raise SystemExit(f"the daemon did not answer within 180 s; see {log}")


def measure(address: str, width: int, height: int, fps: float, seconds: float) -> dict[str, float]:
    clip = moving_shapes(width, height, 64)
    arrivals: list[int] = []
    latencies: list[float] = []
    with DaemonClient(address, timeout_s=30.0) as client:
        with client.open_session(width=width, height=height, fps=fps, preset="anime", client="bench-pacing") as s:
            start = time.monotonic()
            i = 0
            while time.monotonic() - start < seconds:
                if time.monotonic() >= start + i / fps:
                    s.send(clip[i % len(clip)], timestamp_ns=time.monotonic_ns())
                    i += 1
                out = s.recv(timeout_s=max(0.0, min(0.002, start + i / fps - time.monotonic())))
                if out is not None:
                    now = time.monotonic_ns()
                    arrivals.append(now)
                    latencies.append((now - out.timestamp_ns) / 1e6)
            daemon_jitter = s.status().jitter_ms
    steady = np.diff(arrivals[len(arrivals) // 3 :]) / 1e6
    tail = latencies[len(latencies) // 3 :]
    if len(steady) < 10:
        raise SystemExit(f"only {len(arrivals)} outputs in {seconds:g} s: the engine is too slow for {fps:g} fps")
    target = 1000.0 / fps
    p50, p95 = percentile(tail, 50), percentile(tail, 95)
    return {
        "fps": fps,
        "outputs": len(arrivals),
        "output_interval_ms_target": target,
        "output_interval_ms_mean": float(steady.mean()),
        "output_interval_ms_std": float(steady.std()),
        "interval_error_ratio": abs(float(steady.mean()) - target) / target,
        "daemon_jitter_ms": float(daemon_jitter) if daemon_jitter is not None else float("nan"),
        "latency_ms_p50": p50,
        "latency_ms_p95": p95,
        "latency_ms_p99": percentile(tail, 99),
        "latency_spread_ms": p95 - p50,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemon", default=None, help="a running daemon's control address (default: start one)")
    parser.add_argument("--size", default="64x64", help="frame size WxH")
    parser.add_argument("--fps", type=float, default=15.0, help="source frame rate")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to stream")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    width, height = parse_size(args.size)
    proc = None
    address = args.daemon
    with tempfile.TemporaryDirectory() as tmp:
        if address is None:
            proc, address = start_daemon(Path(tmp) / "daemon.log")
        try:
            figures = measure(address, width, height, args.fps, args.seconds)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    result = {**stamp(), "size": f"{width}x{height}", "daemon": args.daemon or "tiny on cpu (started)", **figures}
    report(f"sdlive pacing ({result['date']})", [(k, v) for k, v in figures.items()], result, args.json)


if __name__ == "__main__":
    main()
