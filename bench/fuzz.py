"""Coverage-guided fuzzing (atheris, libFuzzer) of what the daemon parses from clients, beside the hypothesis tests.

    pip install atheris
    python bench/fuzz.py --seconds 60 --json out/fuzz.json

Each target runs in its own child process for ``--seconds`` (atheris owns its process: it calls ``exit`` at the
end of a run) and must only ever return or raise its module's own error:

* ``request``: any bytes → ``decode_request`` returns a request or raises ``ProtocolError`` (the control socket);
* ``netframe``: any bytes split into a header and a payload → ``decode_frame`` returns a frame or raises
  ``NetFrameError`` (network sessions' frames, JPEG/PNG included);
* ``ring``: any bytes as a ring header → ``_validate_header`` returns a size or raises ``RingError`` (a client's
  own shared memory).

Any other exception is a crash: libFuzzer stops, writes the input as ``crash-*`` in ``--artifacts`` and the child
exits non-zero. JSON keys per target: ``runs`` (inputs executed), ``coverage`` (libFuzzer's final ``cov``), ``crashes``
(0 or 1: the first crash stops a target), ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("request", "netframe", "ring")


def _target(name: str):
    """The fuzz function for ``name``: imports stay inside, under atheris' instrumentation."""
    import atheris

    with atheris.instrument_imports():
        from sdlive.daemon.protocol.errors import ProtocolError
        from sdlive.daemon.protocol.messages import decode_request
        from sdlive.daemon.protocol.netframe import NETFRAME_HEADER_SIZE, NetFrameError, decode_frame
        from sdlive.daemon.protocol.ring import HEADER_SIZE, RingError, _validate_header

    def request(data: bytes) -> None:
        try:
            decode_request(data)
        except ProtocolError:
            pass

    def netframe(data: bytes) -> None:
        try:
            decode_frame(data[:NETFRAME_HEADER_SIZE], data[NETFRAME_HEADER_SIZE:])
        except NetFrameError:
            pass

    def ring(data: bytes) -> None:
        header = data[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0")
        size = int.from_bytes(data[HEADER_SIZE : HEADER_SIZE + 4], "little") if len(data) > HEADER_SIZE else None
        try:
            _validate_header("fuzz", header, size)
        except RingError:
            pass

    return {"request": request, "netframe": netframe, "ring": ring}[name]


def _seeds(name: str) -> list[bytes]:
    """Valid inputs to start from, so mutations reach past the first check (JSON syntax, the magic number)."""
    import numpy as np

    if name == "request":
        return [
            json.dumps(m).encode()
            for m in (
                {"op": "hello", "client": "fuzz", "protocol": 1},
                {"op": "open_session", "width": 512, "height": 512, "fps": 30, "preset": "anime", "id": 1},
                {"op": "set_params", "session_id": "s1", "params": {"prompt": "a", "steps": 2, "noise_scale": 0.7}},
                {"op": "set_preset", "session_id": "s1", "preset": "next"},
                {"op": "status", "token": "t"},
            )
        ]
    if name == "netframe":
        from sdlive.daemon.protocol.netframe import encode_frame

        frame = np.zeros((16, 16, 3), np.uint8)
        return [b"".join(bytes(p) for p in encode_frame(frame, seq=1, timestamp_ns=1, pixel_format="rgb24", encoding=e))
                for e in ("raw", "jpeg")]  # fmt: skip
    from sdlive.daemon.protocol.ring import HEADER_SIZE, FrameRing

    ring = FrameRing.create(f"fuzz-seed-{os.getpid()}", width=16, height=16, pixel_format="rgb24", slots=2)
    try:
        header = bytes(ring._buf[:HEADER_SIZE])
    finally:
        ring.unlink()
        ring.close()
    return [header + ring_size.to_bytes(4, "little") for ring_size in (0, len(header))]


def _child(name: str, seconds: int, artifacts: str) -> None:
    import atheris

    fn = _target(name)
    corpus = Path(tempfile.mkdtemp(prefix=f"sdlive-fuzz-{name}-"))
    for i, seed in enumerate(_seeds(name)):
        (corpus / f"seed{i}").write_bytes(seed)
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", f"-artifact_prefix={artifacts}/{name}-",
                   "-max_len=4096", "-print_final_stats=1", str(corpus)], fn)  # fmt: skip
    atheris.Fuzz()


def _run(name: str, seconds: int, artifacts: Path) -> dict:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, "--seconds", str(seconds), "--artifacts", str(artifacts)],
        capture_output=True, text=True, timeout=seconds + 120,
    )  # fmt: skip
    log = proc.stderr + proc.stdout
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    cov = re.findall(r"cov: (\d+)", log)
    crashed = proc.returncode != 0
    if crashed:
        print(log[-3000:], file=sys.stderr)
    return {
        "runs": int(runs[-1]) if runs else 0,
        "coverage": int(cov[-1]) if cov else 0,
        "crashes": int(crashed),
        "seconds": round(time.monotonic() - started, 1),
        "exit_code": proc.returncode,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--artifacts", type=Path, default=Path("out/fuzz-artifacts"), help="where crash inputs go")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.seconds, str(args.artifacts))
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install atheris (Linux/macOS wheels)", file=sys.stderr)
        return 2
    args.artifacts.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in [t.strip() for t in args.targets.split(",") if t.strip()]:
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}: expected {', '.join(TARGETS)}")
        results[name] = _run(name, args.seconds, args.artifacts)
    print(f"{'target':<10} {'runs':>10} {'coverage':>9} {'crashes':>8} {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:<10} {r['runs']:>10} {r['coverage']:>9} {r['crashes']:>8} {r['seconds']:>8}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seconds_per_target": args.seconds, "targets": results}, indent=2) + "\n")
    return 1 if any(r["crashes"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
