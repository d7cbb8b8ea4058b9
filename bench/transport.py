"""Transport benchmark: what it costs to move a frame through sdlive's wire contract.

    python bench/transport.py --size 1280x720 --frames 300 --json out/transport.json
    python bench/transport.py --daemon tcp://127.0.0.1:5557      # control RTT against a running daemon's hello

Measures, each between two real processes on this machine:

* ``ring_ms_*``: write + notify + read of one BGRA frame through a shared-memory ring (``FrameRing``), the path the
  shipped clients use: the producer's ``write`` publishes the frame and futex-wakes the consumer, a second process
  blocked in ``FrameRing.wait``, which copies the frame into its own buffer (``read_next(out=...)``). Variants:
  ``ring_zmq_ms_*`` (woken by a ZeroMQ PUSH/PULL message carrying the seq instead), ``ring_poll_ms_*`` (woken by
  0.5 ms sleeps: no futex, as on macOS/Windows or a foreign-language producer), ``ring_zero_copy_ms_*`` (futex
  wait, the consumer takes a read-only view of the slot and checks the seqlock after use, as the OBS filter
  uploading straight from shared memory does). The producer waits for the consumer's ack between frames, so each
  figure is one frame's latency, not a queue.
* ``memcpy_ms_p50``: one plain copy of the same frames in this process, same run; ``ratio_vs_memcpy`` =
  ``ring_ms_p50 / memcpy_ms_p50`` (a copy-out ring moves the bytes twice: into shared memory and out of it).
* ``control_rtt_ms_*``: a DEALER -> ROUTER JSON round trip on loopback: ``hello`` against an echo server in a second
  process that decodes every request with ``decode_request`` and answers with ``ok_reply`` (or the daemon at
  ``--daemon``).
* ``net_raw_*`` / ``net_jpeg_*``: the network transport over loopback TCP (``netframe``): latency of one frame
  (encode + send + receive + decode), and throughput (``*_fps``) with the sender streaming freely.

Every frame's timings print with ``--per-frame`` (off by default: printing costs more than what is measured).
Results go to the table and ``--json``; see docs/protocol.md for the transport design these numbers justify.
"""

from __future__ import annotations

import argparse
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import moving_shapes, parse_size, percentile, report, stamp  # noqa: E402

from sdlive.daemon.protocol.errors import ProtocolError  # noqa: E402
from sdlive.daemon.protocol.messages import (  # noqa: E402
    Capabilities,
    HelloReply,
    HelloRequest,
    ShutdownReply,
    ShutdownRequest,
    decode_reply,
    decode_request,
    encode_request,
    error_reply,
    ok_reply,
)
from sdlive.daemon.protocol.netframe import recv_frame, send_frame  # noqa: E402
from sdlive.daemon.protocol.ring import FrameRing  # noqa: E402

TARGETS = {"ratio_vs_memcpy": 2.0, "ring_ms_p99": 3.0, "control_rtt_ms_p99": 2.0}
WARMUP = 20  # frames whose timings are not kept: page faults on first touch of the shared mapping, socket setup
_MSG = struct.Struct("<QQ")  # (seq, t_ns): notification and ack payloads


def _ms(ns: float) -> float:
    return ns / 1e6


def _stats(prefix: str, values_ms: list[float]) -> dict[str, float]:
    return {
        f"{prefix}_p50": percentile(values_ms, 50),
        f"{prefix}_p95": percentile(values_ms, 95),
        f"{prefix}_p99": percentile(values_ms, 99),
        f"{prefix}_max": max(values_ms) if values_ms else float("nan"),
    }


def _child(role: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--role", role, *args])


_IPC_FILES: list[str] = []


def _local_endpoint(sock: zmq.Socket, label: str) -> str:
    """Bind ``sock`` to an ipc endpoint where there is one (POSIX), else to a loopback TCP port."""
    if os.name == "posix":
        path = f"{tempfile.gettempdir()}/sdlive-bench-{os.getpid()}-{label}-{uuid.uuid4().hex[:6]}"
        sock.bind(f"ipc://{path}")
        _IPC_FILES.append(path)  # removed in bench_ring's cleanup
        return f"ipc://{path}"
    return f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"


def _socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


# ================================================================================================ memcpy baseline


def bench_memcpy(clip: np.ndarray, frames: int) -> list[float]:
    """One copy of each frame's bytes into a preallocated buffer, with the primitive the ring uses, over the same
    distinct frames the ring benchmark writes."""
    sources = [memoryview(np.ascontiguousarray(f)).cast("B") for f in clip]
    dst = memoryview(bytearray(clip[0].nbytes))
    times = []
    for i in range(frames + WARMUP):
        src = sources[i % len(sources)]
        t0 = time.perf_counter_ns()
        dst[:] = src
        t1 = time.perf_counter_ns()
        if i >= WARMUP:
            times.append(_ms(t1 - t0))
    return times


# ============================================================================================ shared-memory ring


def ring_consumer(name: str, mode: str, read: str, notify_addr: str, ack_addr: str) -> None:
    """Second process: wait for each frame (futex wait, short-sleep poll or a ZeroMQ message), take it, ack."""
    ctx = zmq.Context()
    ack = _socket(ctx, zmq.PUSH)
    ack.connect(ack_addr)
    notify = None
    if mode == "zmq":
        notify = _socket(ctx, zmq.PULL)
        notify.connect(notify_addr)
    ring = FrameRing.open(name)
    out = bytearray(ring.frame_size)  # the consumer's own buffer (a texture upload buffer, a tensor)
    ack.send(_MSG.pack(0, 0))  # ready
    while True:
        if notify is not None:
            seq, _t_written = _MSG.unpack(notify.recv())
            if seq == 0:
                break
        else:
            if ring.closed_flag:
                break
            if not ring.wait(0.05, futex=(mode == "futex")):
                continue
        t_woken = time.monotonic_ns()
        if read == "view":
            # zero-copy: a view into the slot, checked after use (the OBS filter uploads straight from it)
            frame = ring.read_next(copy=False)
            if frame is not None and not ring.still_valid(frame):
                raise SystemExit("torn zero-copy read in a lock-step benchmark")
        else:
            frame = ring.read_next(out=out)
        t_done = time.monotonic_ns()
        if frame is None:
            continue
        # ack: (seq, end-to-end ns) and (woken at, done at) so the producer can split the total
        ack.send_multipart([_MSG.pack(frame.seq, t_done - frame.timestamp_ns), _MSG.pack(t_woken, t_done)])
        del frame
    ring.close()
    ctx.destroy(linger=0)


def bench_ring(clip: np.ndarray, frames: int, mode: str, read: str, *, per_frame: bool) -> dict[str, list[float]]:
    height, width = clip.shape[1:3]
    name = f"sdlive-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ring = FrameRing.create(name, width=width, height=height, pixel_format="bgra", slots=4)
    ctx = zmq.Context()
    notify = _socket(ctx, zmq.PUSH)
    ack = _socket(ctx, zmq.PULL)
    notify_addr = _local_endpoint(notify, "notify")
    ack_addr = _local_endpoint(ack, "ack")
    child = _child("ring-consumer", name, mode, read, notify_addr, ack_addr)
    total, write, notify_ms, read = [], [], [], []
    try:
        if not ack.poll(30000):
            raise SystemExit("ring consumer process did not start")
        ack.recv()
        for i in range(frames + WARMUP):
            frame = clip[i % len(clip)]  # distinct frames, as a camera gives: nothing stays hot in cache
            t0 = time.monotonic_ns()
            seq = ring.write(frame, timestamp_ns=t0)
            t_written = time.monotonic_ns()
            if mode == "zmq":
                notify.send(_MSG.pack(seq, t_written))
            if not ack.poll(10000):
                raise SystemExit(f"ring consumer stopped answering at frame {seq}")
            head, times = ack.recv_multipart()
            got_seq, latency_ns = _MSG.unpack(head)
            t_woken, t_done = _MSG.unpack(times)
            assert got_seq == seq, (got_seq, seq)
            if i >= WARMUP:
                total.append(_ms(latency_ns))
                write.append(_ms(t_written - t0))
                notify_ms.append(_ms(t_woken - t_written))
                read.append(_ms(t_done - t_woken))
                if per_frame:  # per-iteration detail behind a flag (vLLM's log_iteration_details habit)
                    print(f"ring[{mode},{read}] seq={seq} total={total[-1]:.3f} write={write[-1]:.3f} "
                          f"wake={notify_ms[-1]:.3f} read={read[-1]:.3f} ms", file=sys.stderr)  # fmt: skip
        if mode == "zmq":
            notify.send(_MSG.pack(0, 0))
        ring.mark_closed()
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        ring.unlink()
        ring.close()
        ctx.destroy(linger=0)
        while _IPC_FILES:
            Path(_IPC_FILES.pop()).unlink(missing_ok=True)
    return {"total": total, "write": write, "wake": notify_ms, "read": read}


# ========================================================================================== control round trip


def control_echo(address_file: str) -> None:
    """Second process: a ROUTER that decodes every request with the protocol decoder and answers it."""
    ctx = zmq.Context()
    router = _socket(ctx, zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    hello = HelloReply(daemon_version="bench", model="none", device="cpu", capabilities=Capabilities(max_sessions=1))
    Path(address_file).write_text(f"tcp://127.0.0.1:{port}")
    while True:
        identity, raw = router.recv_multipart()
        try:
            request = decode_request(raw)
        except ProtocolError as exc:
            router.send_multipart([identity, error_reply(exc.code, exc.message, id=exc.id)])
            continue
        if request.op == "shutdown":
            router.send_multipart([identity, ok_reply(ShutdownReply(), id=request.id)])
            break
        router.send_multipart([identity, ok_reply(hello, id=request.id)])
    ctx.destroy(linger=0)


def bench_control(frames: int, daemon: str | None, tmpdir: Path) -> tuple[list[float], str]:
    child = None
    if daemon:
        address, target = daemon, f"daemon at {daemon}"
    else:
        address_file = tmpdir / f"sdlive-bench-echo-{os.getpid()}.addr"
        address_file.unlink(missing_ok=True)
        child = _child("control-echo", str(address_file))
        deadline = time.monotonic() + 30
        while not address_file.exists() or not address_file.read_text():
            if time.monotonic() > deadline:
                raise SystemExit("control echo process did not start")
            time.sleep(0.01)
        address, target = address_file.read_text(), "in-bench ROUTER echo (decode_request + ok_reply)"
        address_file.unlink()
    ctx = zmq.Context()
    dealer = _socket(ctx, zmq.DEALER)
    dealer.connect(address)
    times = []
    try:
        for i in range(frames + WARMUP):
            raw = encode_request(HelloRequest(id=i, client="bench/transport.py"))
            t0 = time.perf_counter_ns()
            dealer.send(raw)
            if not dealer.poll(5000):
                raise SystemExit(f"no reply from {address}: is the daemon running? (sdlive serve)")
            reply = dealer.recv()
            t1 = time.perf_counter_ns()
            parsed = decode_reply(reply, "hello")
            assert parsed.ok and parsed.id == i, reply
            if i >= WARMUP:
                times.append(_ms(t1 - t0))
        if child is not None:
            dealer.send(encode_request(ShutdownRequest()))
            dealer.poll(5000)
            child.wait(timeout=10)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        ctx.destroy(linger=0)
    return times, target


# ============================================================================================== network frames


def net_receiver(address: str, ack_addr: str) -> None:
    """Second process: PULL frames, decode them, ack (seq, end-to-end ns); a seq of 0 ends."""
    ctx = zmq.Context()
    pull = _socket(ctx, zmq.PULL)
    pull.bind(address)
    ack = _socket(ctx, zmq.PUSH)
    ack.connect(ack_addr)
    ack.send(_MSG.pack(0, 0))
    while True:
        info, pixels = recv_frame(pull)
        if info.seq == 0:
            break
        if pixels.shape[2] != 4:
            raise SystemExit(f"unexpected decoded frame shape {pixels.shape}")
        ack.send(_MSG.pack(info.seq, time.monotonic_ns() - info.timestamp_ns))
    ctx.destroy(linger=0)


def bench_net(clip: np.ndarray, frames: int, encoding: str, *, per_frame: bool) -> dict[str, float | list[float]]:
    ctx = zmq.Context()
    ack = _socket(ctx, zmq.PULL)
    ack_port = ack.bind_to_random_port("tcp://127.0.0.1")
    with socket_port() as port:
        address = f"tcp://127.0.0.1:{port}"
    child = _child("net-receiver", address, f"tcp://127.0.0.1:{ack_port}")
    push = _socket(ctx, zmq.PUSH)
    push.connect(address)
    latency, sizes = [], []
    try:
        if not ack.poll(30000):
            raise SystemExit("network receiver process did not start")
        ack.recv()
        # 1. latency: one frame in flight at a time
        for i in range(frames + WARMUP):
            frame = clip[i % len(clip)]
            t0 = time.monotonic_ns()
            send_frame(push, frame, seq=i + 1, timestamp_ns=t0, pixel_format="bgra", encoding=encoding)
            if not ack.poll(10000):
                raise SystemExit(f"network receiver stopped answering at frame {i + 1}")
            seq, latency_ns = _MSG.unpack(ack.recv())
            if i >= WARMUP:
                latency.append(_ms(latency_ns))
                if per_frame:
                    print(f"net[{encoding}] seq={seq} total={latency[-1]:.3f} ms", file=sys.stderr)
        # 2. throughput: the sender streams freely (ZeroMQ's high-water mark bounds the queue)
        base = frames + WARMUP
        t_start = time.monotonic_ns()
        for i in range(frames):
            frame = clip[i % len(clip)]
            head_seq = base + i + 1
            send_frame(push, frame, seq=head_seq, timestamp_ns=time.monotonic_ns(), pixel_format="bgra",
                       encoding=encoding)  # fmt: skip
        for _ in range(frames):
            if not ack.poll(30000):
                raise SystemExit("network receiver stalled during the throughput run")
            ack.recv()
        elapsed_s = (time.monotonic_ns() - t_start) / 1e9
        if encoding == "jpeg":
            from sdlive.daemon.protocol.netframe import encode_frame

            for frame in clip[:10]:
                sizes.append(len(encode_frame(frame, seq=1, timestamp_ns=0, pixel_format="bgra", encoding="jpeg")[1]))
        send_frame(push, clip[0], seq=0, timestamp_ns=0, pixel_format="bgra")
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        ctx.destroy(linger=0)
    return {
        "latency": latency,
        "fps": frames / elapsed_s,
        "bytes": float(np.mean(sizes)) if sizes else float(clip[0].nbytes),
    }


class socket_port:
    """A free loopback TCP port (bound and released) for a child process to bind."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return self._sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


# ========================================================================================================= main


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1280x720", help="frame size WxH (BGRA)")
    parser.add_argument("--frames", type=int, default=300, help="timed frames per measurement")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--daemon", default=None, help="measure control RTT against this daemon's hello")
    parser.add_argument("--skip-net", action="store_true", help="skip the network transport")
    parser.add_argument("--per-frame", action="store_true", help="print every frame's timings to stderr")
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()

    if args.role == "ring-consumer":
        return ring_consumer(*rest)
    if args.role == "control-echo":
        return control_echo(*rest)
    if args.role == "net-receiver":
        return net_receiver(*rest)

    width, height = parse_size(args.size)
    clip = moving_shapes(width, height, 8, channels=4)  # 8 distinct BGRA frames
    frame_bytes = clip[0].nbytes
    tmpdir = Path(tempfile.gettempdir())

    memcpy = bench_memcpy(clip, args.frames)
    memcpy_p50 = percentile(memcpy, 50)
    # (key prefix, wait strategy, read style): the first is the shipped path and the one the targets judge
    variants = [
        ("ring_ms", "futex", "copy"),
        ("ring_zmq_ms", "zmq", "copy"),
        ("ring_poll_ms", "poll", "copy"),
        ("ring_zero_copy_ms", "futex", "view"),
    ]
    result: dict = {
        **stamp(),
        "device": device_name(),
        "size": f"{width}x{height}",
        "pixel_format": "bgra",
        "frame_bytes": frame_bytes,
        "frames": args.frames,
        "notify": "FrameRing.wait: futex wait on write_count (Linux), the producer wakes it after each publish; "
        "the consumer copies the frame into its own buffer (read_next(out=...))",
        "memcpy_ms_p50": memcpy_p50,
    }
    for key, mode, read in variants:
        timings = bench_ring(clip, args.frames, mode, read, per_frame=args.per_frame)
        result.update(_stats(key, timings["total"]))
        stem = key[: -len("_ms")]
        for part in ("write", "read"):  # the producer's write() (futex wake included) and the consumer's read
            result[f"{stem}_{part}_ms_p50"] = percentile(timings[part], 50)
        result[f"{stem}_ratio_vs_memcpy"] = result[f"{key}_p50"] / memcpy_p50
    result["ratio_vs_memcpy"] = result.pop("ring_ratio_vs_memcpy")

    control, control_target = bench_control(args.frames, args.daemon, tmpdir)
    result["control_target"] = control_target
    result.update(_stats("control_rtt_ms", control))
    if not args.skip_net:
        for encoding in ("raw", "jpeg"):
            net = bench_net(clip, args.frames, encoding, per_frame=args.per_frame)
            result.update(_stats(f"net_{encoding}_ms", net["latency"]))
            result[f"net_{encoding}_fps"] = net["fps"]
            result[f"net_{encoding}_bytes_per_frame"] = net["bytes"]
        result["net_ms_p50"] = result["net_raw_ms_p50"]
        result["net_fps"] = result["net_raw_fps"]
    result["targets"] = TARGETS
    result["targets_met"] = {key: bool(result[key] <= limit) for key, limit in TARGETS.items()}

    def split(stem: str) -> str:
        return " / ".join(f"{result[f'{stem}_{part}_ms_p50']:.3f}" for part in ("write", "read"))

    rows: list[tuple[str, object]] = [
        ("device", result["device"]),
        ("frame", f"{width}x{height} BGRA, {frame_bytes / 1e6:.2f} MB"),
        ("memcpy_ms_p50 (one copy, same frames)", memcpy_p50),
    ]
    labels = {
        "ring_ms": "ring, futex wait, copy out",
        "ring_zmq_ms": "ring, ZeroMQ notify, copy out",
        "ring_poll_ms": "ring, 0.5 ms sleep poll, copy out",
        "ring_zero_copy_ms": "ring, futex wait, zero-copy view",
    }
    for key, _mode, _read in variants:
        stem = key[: -len("_ms")]
        ratio = result["ratio_vs_memcpy"] if key == "ring_ms" else result[f"{stem}_ratio_vs_memcpy"]
        rows += [
            (f"{key}_p50 / p99  [{labels[key]}]", f"{result[f'{key}_p50']:.3f} / {result[f'{key}_p99']:.3f}"),
            ("  write / read p50, ratio to memcpy", f"{split(stem)}  x{ratio:.2f}"),
        ]
    rows += [
        ("control_rtt_ms_p50 / p99", f"{result['control_rtt_ms_p50']:.3f} / {result['control_rtt_ms_p99']:.3f}"),
    ]
    if not args.skip_net:
        for encoding in ("raw", "jpeg"):
            rows += [
                (
                    f"net_{encoding}_ms_p50 / p99",
                    f"{result[f'net_{encoding}_ms_p50']:.3f} / {result[f'net_{encoding}_ms_p99']:.3f}",
                ),  # fmt: skip
                (f"net_{encoding}_fps", result[f"net_{encoding}_fps"]),
                (f"net_{encoding}_bytes_per_frame", int(result[f"net_{encoding}_bytes_per_frame"])),
            ]
    rows += [
        (f"target {key} <= {limit}", f"{'met' if result['targets_met'][key] else 'MISSED'} ({result[key]:.3f})")
        for key, limit in TARGETS.items()
    ]
    report(f"sdlive transport ({result['date']})", rows, result, args.json)


if __name__ == "__main__":
    main()
