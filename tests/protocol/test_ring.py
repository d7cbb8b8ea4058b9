"""The shared-memory frame ring: ordering, newest-wins, drop counting, the seqlock, cross-process use with the
stdlib only, owner-only permissions, cleanup, and exact errors for corrupt headers."""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from sdlive.daemon.protocol import ring as ring_mod
from sdlive.daemon.protocol.ring import (
    FLAG_PAUSED,
    HEADER_SIZE,
    PIXEL_FORMATS,
    FrameRing,
    RingError,
    ring_path,
)

RING_FILE = Path(ring_mod.__file__)
POSIX = sys.platform != "win32"


@pytest.fixture
def name():
    n = f"sdlive-test-{uuid.uuid4().hex[:12]}"
    yield n
    if POSIX:
        try:
            os.unlink(ring_path(n))
        except FileNotFoundError:
            pass


def frame(width: int, height: int, bpp: int, value: int) -> bytes:
    return bytes([value % 256]) * (width * height * bpp)


@pytest.fixture
def pair(name):
    producer = FrameRing.create(name, width=8, height=4, pixel_format="bgra", slots=4)
    consumer = FrameRing.open(name)
    yield producer, consumer
    consumer.close()
    producer.unlink()
    producer.close()


def test_frames_come_out_in_order_with_their_timestamps(pair):
    producer, consumer = pair
    assert consumer.read_next() is None
    for i in range(3):
        assert producer.write(frame(8, 4, 4, i), timestamp_ns=1000 + i) == i + 1
    got = [consumer.read_next() for _ in range(3)]
    assert [f.seq for f in got] == [1, 2, 3]
    assert [f.timestamp_ns for f in got] == [1000, 1001, 1002]
    assert [bytes(f.data) for f in got] == [frame(8, 4, 4, i) for i in range(3)]
    assert consumer.read_next() is None
    assert (consumer.read, consumer.dropped, producer.written) == (3, 0, 3)
    assert producer.header_counters() == (3, 3, 0)


def test_read_latest_returns_the_newest_and_counts_the_skipped_as_dropped(pair):
    producer, consumer = pair
    for i in range(3):
        producer.write(frame(8, 4, 4, i), timestamp_ns=i)
    latest = consumer.read_latest()
    assert latest.seq == 3 and bytes(latest.data) == frame(8, 4, 4, 2)
    assert consumer.dropped == 2
    assert consumer.read_latest() is None  # nothing newer than what was read


def test_a_lapped_reader_skips_to_the_oldest_frame_still_in_the_ring_and_counts_drops(pair):
    producer, consumer = pair  # 4 slots
    for i in range(10):
        producer.write(frame(8, 4, 4, i), timestamp_ns=i)
    first = consumer.read_next()
    assert first.seq == 7  # frames 7..10 are still in the 4 slots
    assert bytes(first.data) == frame(8, 4, 4, 6)
    assert consumer.dropped == 6
    assert [consumer.read_next().seq for _ in range(3)] == [8, 9, 10]
    assert producer.header_counters() == (10, 10, 6)


def test_the_seqlock_detects_a_slot_being_written(pair):
    producer, consumer = pair
    producer.write(frame(8, 4, 4, 1), timestamp_ns=1)
    producer.write(frame(8, 4, 4, 2), timestamp_ns=2)
    slot0 = HEADER_SIZE  # frame 1 lives in slot 0
    # Simulate a writer mid-way through frame 1's slot: the seq word is odd.
    struct.pack_into("<Q", producer._buf, slot0, 2 * 1 - 1)
    got = consumer.read_next()
    assert got.seq == 2, "a slot whose seq is odd must never be returned"
    assert consumer.dropped == 1


def test_the_seqlock_detects_a_torn_copy_when_the_seq_changes_during_the_read(pair, monkeypatch):
    producer, consumer = pair
    producer.write(frame(8, 4, 4, 1), timestamp_ns=1)
    producer.write(frame(8, 4, 4, 2), timestamp_ns=2)
    real_head = ring_mod._SLOT_HEAD
    lapped = []

    class WriterArrivesDuringTheCopy:
        """The first slot-header read succeeds, then the writer starts overwriting that slot (seq goes odd)."""

        def unpack_from(self, buf, offset):
            values = real_head.unpack_from(buf, offset)
            if not lapped:
                lapped.append(values[0] // 2)
                struct.pack_into("<Q", buf, offset, values[0] + 1)
            return values

    monkeypatch.setattr(ring_mod, "_SLOT_HEAD", WriterArrivesDuringTheCopy())
    got = consumer.read_next()
    assert lapped == [1]
    assert got.seq == 2, "the torn copy of frame 1 must be discarded"
    assert consumer.dropped == 1


def test_a_zero_copy_frame_reports_when_the_writer_overwrote_it(pair):
    producer, consumer = pair
    producer.write(frame(8, 4, 4, 7), timestamp_ns=7)
    view = consumer.read_next(copy=False)
    assert isinstance(view.data, memoryview) and view.data.readonly
    assert bytes(view.data) == frame(8, 4, 4, 7) and consumer.still_valid(view)
    for i in range(4):  # the fourth write reuses slot 0
        producer.write(frame(8, 4, 4, i), timestamp_ns=i)
    assert not consumer.still_valid(view)


def test_pixels_address_points_at_the_slot_pixels_for_zero_copy_uploads(pair):
    producer, consumer = pair
    for i in range(6):  # wrap around the 4 slots
        producer.write(frame(8, 4, 4, 40 + i), timestamp_ns=i)
    latest = consumer.read_latest(copy=False)
    assert ctypes.string_at(consumer.pixels_address(latest.seq), producer.frame_size) == frame(8, 4, 4, 45)
    assert consumer.still_valid(latest)
    del latest
    consumer.close()
    with pytest.raises(RingError, match="closed"):
        consumer.pixels_address(1)


def test_read_into_a_caller_buffer(pair):
    producer, consumer = pair
    producer.write(frame(8, 4, 4, 9), timestamp_ns=9)
    out = bytearray(producer.frame_size)
    got = consumer.read_next(out=out)
    assert got.data is out and bytes(out) == frame(8, 4, 4, 9)
    with pytest.raises(ValueError, match="out buffer is 3 bytes"):
        producer.write(frame(8, 4, 4, 1))
        consumer.read_next(out=bytearray(3))


def test_write_rejects_a_frame_of_the_wrong_size_naming_both_sizes(pair):
    producer, _ = pair
    with pytest.raises(ValueError, match=r"frame is 10 bytes, ring .* takes 128 \(8x4 bgra\)"):
        producer.write(b"x" * 10)


def test_write_takes_any_contiguous_buffer_including_numpy(pair):
    np = pytest.importorskip("numpy")
    producer, consumer = pair
    pixels = np.arange(4 * 8 * 4, dtype=np.uint8).reshape(4, 8, 4)
    producer.write(pixels, timestamp_ns=5)
    assert bytes(consumer.read_next().data) == pixels.tobytes()
    with pytest.raises(ValueError, match="not C-contiguous"):
        producer.write(np.zeros((8, 4, 4), np.uint8).transpose(1, 0, 2))


def test_wait_returns_when_a_frame_arrives_and_times_out_otherwise(pair):
    producer, consumer = pair
    assert consumer.wait(0.01) is False
    producer.write(frame(8, 4, 4, 1))
    assert consumer.wait(0.01) is True


@pytest.mark.skipif(ring_mod._FUTEX is None, reason="futex wake-ups are Linux (64-bit) only; elsewhere wait() polls")
def test_a_blocked_waiter_is_woken_by_the_futex_not_by_its_timeout(pair):
    producer, consumer = pair
    producer.write(frame(8, 4, 4, 0))  # the first write sets the header's FUTEX wake flag
    consumer.read_next()
    assert producer.header_counters()[0] == 1
    assert struct.unpack_from("<I", producer._buf, ring_mod.OFF_WAKE_FLAGS)[0] & ring_mod.WAKE_FUTEX
    woke_after = []

    def waiter():
        started = time.monotonic()
        # poll_s is huge: only a futex wake-up can return this quickly
        woke_after.append((consumer.wait(5.0, poll_s=5.0), time.monotonic() - started))

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)  # let it block
    producer.write(frame(8, 4, 4, 1))
    thread.join(5)
    got, elapsed = woke_after[0]
    assert got is True
    assert elapsed < 1.0, f"woke after {elapsed:.3f}s: the futex wake did not reach the waiter"
    assert consumer.read_next().seq == 2


def test_without_the_wake_flag_wait_falls_back_to_short_sleeps(pair):
    producer, consumer = pair
    started = time.monotonic()
    assert consumer.wait(0.05, poll_s=0.005) is False  # nothing written: the timeout is honoured
    assert 0.04 <= time.monotonic() - started < 1.0
    producer.write(frame(8, 4, 4, 1))
    struct.pack_into("<I", producer._buf, ring_mod.OFF_WAKE_FLAGS, 0)  # a producer that never wakes (foreign)
    consumer.read_next()

    def late_write():
        time.sleep(0.05)
        # a raw publish with no futex wake, as a client in another language without futex would do
        n = 2
        base = HEADER_SIZE + ((n - 1) % producer.slots) * producer.slot_size
        struct.pack_into("<Q", producer._buf, base, 2 * n)
        struct.pack_into("<Q", producer._buf, base + 16, producer.frame_size)
        struct.pack_into("<Q", producer._buf, ring_mod.OFF_WRITE_COUNT, n)

    thread = threading.Thread(target=late_write)
    thread.start()
    started = time.monotonic()
    assert consumer.wait(5.0, poll_s=0.002) is True
    assert time.monotonic() - started < 1.0
    thread.join()
    assert consumer.read_next().seq == 2


def test_control_block_round_trip(pair):
    producer, consumer = pair
    block = producer.control()
    assert (block.flags, block.closed) == (0, False)
    consumer.flags = FLAG_PAUSED
    assert producer.control().flags == FLAG_PAUSED
    producer.mark_closed()
    assert consumer.closed_flag and consumer.control().closed


def test_heartbeats_of_each_side(pair):
    producer, consumer = pair
    assert producer.heartbeat_age_s("consumer") > 1e6 or producer.control().consumer_heartbeat_ns == 0
    producer.write(frame(8, 4, 4, 1))
    consumer.read_next()
    assert producer.heartbeat_age_s("consumer") < 5 and consumer.heartbeat_age_s("producer") < 5


def test_an_observer_does_not_move_the_consumer_counters(pair, name):
    producer, consumer = pair
    observer = FrameRing.open(name, observer=True)
    try:
        producer.write(frame(8, 4, 4, 1))
        producer.write(frame(8, 4, 4, 2))
        assert observer.read_latest().seq == 2
        assert producer.header_counters() == (2, 0, 0)
        assert consumer.read_next().seq == 1
    finally:
        observer.close()


@pytest.mark.skipif(not POSIX, reason="/dev/shm permissions are a POSIX matter")
def test_the_ring_file_is_owner_only_and_unlink_removes_it(name):
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        ring = FrameRing.create(name, width=16, height=16, pixel_format="rgb24")
    finally:
        os.umask(old_umask)
    path = ring_path(name)
    if os.path.isdir("/dev/shm") and "SDLIVE_SHM_DIR" not in os.environ:
        assert path == f"/dev/shm/{name}"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ring.unlink()
    assert not os.path.exists(path)
    ring.close()
    ring.close()  # idempotent


def test_create_refuses_an_existing_name(pair, name):
    with pytest.raises(RingError, match="already exists"):
        FrameRing.create(name, width=8, height=4)


def test_open_of_a_missing_ring_names_the_fix():
    with pytest.raises(RingError, match="not found .* open the session first"):
        FrameRing.open(f"sdlive-missing-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize(
    ("bad", "kwargs"),
    [
        ("pixel format", {"pixel_format": "yuv420"}),
        ("width", {"width": 0}),
        ("slots", {"slots": 1}),
    ],
)
def test_create_rejects_bad_geometry(name, bad, kwargs):
    args = {"width": 8, "height": 4, "pixel_format": "bgra", "slots": 4} | kwargs
    with pytest.raises(RingError, match=bad):
        FrameRing.create(name, **args)


def test_invalid_names_are_refused():
    with pytest.raises(RingError, match="invalid ring name"):
        FrameRing.create("../etc/passwd", width=8, height=8)


def _corrupt(name: str, offset: int, fmt: str, value) -> None:
    with open(ring_path(name), "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, value))


@pytest.mark.skipif(not POSIX, reason="corrupts the backing file")
@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (0, "<8s", b"NOTARING", "bad magic"),
        (0, "<8s", b"\x00" * 8, "not initialised"),
        (8, "<I", 99, "layout version 99"),
        (24, "<I", 42, "unknown pixel format code 42"),
        (28, "<I", 7, "stride 7"),
        (32, "<I", 0, "slot count 0"),
        (32, "<I", 200, "truncated"),
        (40, "<Q", 8, "slot_size 8"),
        (16, "<I", 0, "size 0x4"),
    ],
)
def test_a_corrupt_header_raises_ring_error_naming_the_problem(name, offset, fmt, value, message):
    ring = FrameRing.create(name, width=8, height=4, pixel_format="bgra", slots=2)
    ring.close()
    _corrupt(name, offset, fmt, value)
    with pytest.raises(RingError, match=message):
        FrameRing.open(name)


@pytest.mark.skipif(not POSIX, reason="truncates the backing file")
def test_a_truncated_file_raises_ring_error(name):
    FrameRing.create(name, width=8, height=4).close()
    os.truncate(ring_path(name), 100)
    with pytest.raises(RingError, match="smaller than the 256-byte header"):
        FrameRing.open(name)


def test_ring_py_loads_as_a_standalone_file_by_path(pair):
    spec = importlib.util.spec_from_file_location("standalone_sdlive_ring", RING_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    producer, _ = pair
    producer.write(frame(8, 4, 4, 3), timestamp_ns=3)
    other = module.FrameRing.open(producer.name, observer=True)
    try:
        assert bytes(other.read_latest().data) == frame(8, 4, 4, 3)
    finally:
        other.close()


@pytest.mark.parametrize("path", [RING_FILE, RING_FILE.with_name("constants.py")], ids=lambda p: p.name)
def test_ring_and_constants_import_nothing_outside_the_stdlib(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # the one sibling import, which the by-path load replaces with a file load
                assert (path.name, node.module) == ("ring.py", "constants"), node.module
                continue
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) - {"multiprocessing"}, imported


CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("ring_by_path", sys.argv[1])
    ring_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ring_mod)
    ring = ring_mod.FrameRing.open(sys.argv[2])
    frames = []
    while len(frames) < int(sys.argv[3]):
        if not ring.wait(5.0):
            break
        f = ring.read_next()
        frames.append([f.seq, f.timestamp_ns, f.data[0], len(f.data)])
    ring.flags = 1
    ring.close()
    heavy = sorted(m for m in ("numpy", "pydantic", "zmq", "sdlive", "multiprocessing") if m in sys.modules)
    print(json.dumps({"frames": frames, "heavy": heavy, "geometry": [ring.width, ring.height, ring.pixel_format]}))
    """
)


def test_a_second_process_with_the_stdlib_only_reads_what_this_process_wrote(name):
    producer = FrameRing.create(name, width=32, height=8, pixel_format="rgb24", slots=8)
    try:
        for i in range(5):
            producer.write(frame(32, 8, 3, 10 + i), timestamp_ns=5000 + i)
        result = subprocess.run(
            [sys.executable, "-I", "-c", CHILD, str(RING_FILE), name, "5"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["heavy"] == [], f"the child imported {report['heavy']}"
        assert report["geometry"] == [32, 8, "rgb24"]
        assert report["frames"] == [[i + 1, 5000 + i, 10 + i, 32 * 8 * 3] for i in range(5)]
        assert producer.control().flags == FLAG_PAUSED
        assert producer.header_counters() == (5, 5, 0)
    finally:
        producer.unlink()
        producer.close()


@pytest.mark.parametrize("pixel_format", sorted(PIXEL_FORMATS))
def test_every_pixel_format_has_the_right_stride(name, pixel_format):
    ring = FrameRing.create(name, width=10, height=3, pixel_format=pixel_format)
    try:
        assert ring.stride == 10 * PIXEL_FORMATS[pixel_format].bytes_per_pixel
        assert ring.frame_size == ring.stride * 3
        assert ring.slot_size % 64 == 0
    finally:
        ring.unlink()
        ring.close()


WRITER = textwrap.dedent(
    """
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("ring_by_path", sys.argv[1])
    ring_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ring_mod)
    ring = ring_mod.FrameRing.open(sys.argv[2])
    size = ring.frame_size
    frames = [bytes([v]) * size for v in range(251)]
    stop_file, deadline = sys.argv[3], time.monotonic() + 60  # runs until the reader has checked enough
    n = 0
    while time.monotonic() < deadline and (n % 64 or not os.path.exists(stop_file)):
        n += 1
        ring.write(frames[n % 251], timestamp_ns=n)  # every byte of frame n is n % 251, its timestamp is n
    ring.mark_closed()
    print(n)
    """
)


def test_under_a_real_concurrent_writer_every_frame_read_is_whole(name, monkeypatch, tmp_path):
    """A second process writes as fast as it can into 2 slots while this one reads, and every other read stalls
    between checking the slot and copying it (as a preempted reader does), so the writer laps it for real:
    whatever the seqlock lets through must be one frame, never a mix of two."""
    real_head = ring_mod._SLOT_HEAD
    stalls = [0]

    class PreemptedReader:
        def unpack_from(self, buf, offset):
            values = real_head.unpack_from(buf, offset)
            stalls[0] += 1
            if stalls[0] % 2:
                time.sleep(0.001)  # the writer (a few microseconds a frame) laps both slots meanwhile
            return values

    monkeypatch.setattr(ring_mod, "_SLOT_HEAD", PreemptedReader())
    ring = FrameRing.create(name, width=256, height=64, pixel_format="bgra", slots=2)  # 64 KiB frames
    stop_file = tmp_path / "enough"
    writer = subprocess.Popen(
        [sys.executable, "-I", "-c", WRITER, str(RING_FILE), name, str(stop_file)], stdout=subprocess.PIPE, text=True
    )
    checked = 0
    try:
        while not ring.closed_flag:
            if checked >= 50:
                stop_file.touch()  # enough whole frames seen: the writer stops, however loaded the machine is
            frame = ring.read_next() if checked % 2 else ring.read_latest()
            if frame is None:
                ring.wait(0.01)
                continue
            data = frame.data
            expected = frame.seq % 251
            assert frame.timestamp_ns == frame.seq
            assert data.count(expected) == len(data), f"frame {frame.seq} is torn: bytes of another frame inside"
            checked += 1
        written = int(writer.communicate(timeout=30)[0])
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        ring.unlink()
        ring.close()
    assert checked >= 50 and written >= checked
    assert checked + ring.dropped == ring.read, "every frame up to the last read was either read or counted dropped"


def test_read_into_a_shaped_out_buffer(tmp_path):
    """An H×W×C array is a valid ``out`` buffer (the daemon reads frames straight into numpy arrays)."""
    import uuid

    import numpy as np

    name = f"sdlive-test-out-{uuid.uuid4().hex[:8]}"
    ring = FrameRing.create(name, width=4, height=2, pixel_format="bgr24", slots=2)
    try:
        reader = FrameRing.open(name)
        pixels = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
        ring.write(pixels.tobytes(), timestamp_ns=5)
        out = np.zeros((2, 4, 3), dtype=np.uint8)
        frame = reader.read_next(out=out)
        assert frame is not None and frame.timestamp_ns == 5
        np.testing.assert_array_equal(out, pixels)
        reader.close()
    finally:
        ring.close()
        ring.unlink()


# ---------------------------------------------------------------------------------------------- faults (issue 13)

SIGBUS_CHILD = textwrap.dedent(
    """
    import importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("ring_by_path", sys.argv[1])
    ring_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ring_mod)
    name, mode = sys.argv[2], sys.argv[3]
    ring = ring_mod.FrameRing.create(name, width=64, height=64, pixel_format="bgra", slots=2, safe=mode == "safe")
    reader = ring_mod.FrameRing.open(name, safe=mode == "safe")
    ring.write(bytes(ring.frame_size), timestamp_ns=1)
    os.truncate(ring_mod.ring_path(name), 0)  # another process shrinks the file under both mappings
    faults = []
    for what, call in (("write", lambda: ring.write(bytes(ring.frame_size))), ("read_next", reader.read_next),
                       ("read_latest", reader.read_latest), ("control", ring.control), ("written", lambda: ring.written),
                       ("verify", ring.verify)):
        try:
            call()
            faults.append(what + ": no error")
        except ring_mod.RingError as exc:
            faults.append(what + ": " + str(exc))
    ring.unlink()
    print("\\n".join(faults))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs files under /dev/shm")
def test_a_truncated_ring_kills_a_mapped_reader_with_sigbus_but_a_safe_one_gets_ring_errors(name):
    """The hazard is real (a mapped load of a vanished page is SIGBUS), and safe mode (the daemon's) survives it:
    every access names the truncation instead."""
    mapped = subprocess.run([sys.executable, "-I", "-c", SIGBUS_CHILD, str(RING_FILE), name, "mapped"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert mapped.returncode == -signal.SIGBUS, (mapped.returncode, mapped.stderr)
    try:
        os.unlink(ring_path(name))
    except FileNotFoundError:
        pass
    safe = subprocess.run([sys.executable, "-I", "-c", SIGBUS_CHILD, str(RING_FILE), name, "safe"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert safe.returncode == 0, safe.stderr
    lines = safe.stdout.splitlines()
    assert len(lines) == 6 and all("was truncated to 0 bytes, it needs" in line for line in lines), lines


@pytest.mark.skipif(not POSIX, reason="files in the ring folder")
def test_rings_are_allocated_for_real_at_creation(name):
    ring = FrameRing.create(name, width=320, height=240, pixel_format="bgra", slots=4, safe=True)
    try:
        st = os.stat(ring_path(name))
        assert st.st_size == ring.total_size
        assert st.st_blocks * 512 >= ring.total_size, "the ring file is sparse: its first touch could be a SIGBUS"
    finally:
        ring.unlink()
        ring.close()


@pytest.fixture
def small_ring_folder(tmp_path, monkeypatch):
    """An 8 MiB tmpfs as the ring folder, like Docker's small /dev/shm (root only: it mounts one)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    folder = tmp_path / "shm"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    monkeypatch.setenv("SDLIVE_SHM_DIR", str(folder))
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_ring_folder_too_small_fails_creation_naming_the_folder_and_the_fix(small_ring_folder):
    fits = FrameRing.create("sdlive-test-fits", width=640, height=360, pixel_format="bgra", slots=4, safe=True)
    try:
        with pytest.raises(RingError) as err:  # 1280x720 bgra x 4 slots = 14 MiB > what is left of 8 MiB
            FrameRing.create("sdlive-test-toobig", width=1280, height=720, pixel_format="bgra", slots=4, safe=True)
        message = str(err.value)
        assert str(small_ring_folder) in message and "--shm-size" in message and "SDLIVE_SHM_DIR" in message
        assert "MiB free" in message
        assert sorted(os.listdir(small_ring_folder)) == ["sdlive-test-fits"], "a failed ring must leave no file"
        fits.write(bytes(fits.frame_size), timestamp_ns=1)  # the ring that fit is whole: no SIGBUS on its pages
    finally:
        fits.unlink()
        fits.close()


@pytest.mark.skipif(not POSIX, reason="files in the ring folder")
def test_verify_names_a_deleted_a_replaced_and_a_scribbled_ring(name):
    ring = FrameRing.create(name, width=8, height=4, slots=2, safe=True)
    try:
        ring.verify()
        os.unlink(ring_path(name))
        with pytest.raises(RingError, match="was deleted from"):
            ring.verify()
        Path(ring_path(name)).write_bytes(b"\0" * ring.total_size)
        with pytest.raises(RingError, match="replaced by another file"):
            ring.verify()
        ring.unlink()
        assert Path(ring_path(name)).exists(), "unlink must not remove a file that is not this ring"
        os.unlink(ring_path(name))
    finally:
        ring.close()
    ring = FrameRing.create(name, width=8, height=4, slots=2, safe=True)
    try:
        with open(ring_path(name), "r+b") as fh:
            fh.seek(16)
            fh.write(struct.pack("<I", 9))  # width 8 -> 9: the header no longer describes this ring
        with pytest.raises(RingError, match="stride"):
            ring.verify_header()
    finally:
        ring.unlink()
        ring.close()


def test_a_write_count_no_producer_could_reach_is_corruption(pair):
    producer, consumer = pair
    producer.write(frame(8, 4, 4, 1), timestamp_ns=1)
    struct.pack_into("<Q", producer._buf, 56, 2**40)
    with pytest.raises(RingError, match="write_count jumped from 0 to"):
        consumer.read_next()


def test_a_safe_ring_moves_frames_like_a_mapped_one(name):
    producer = FrameRing.create(name, width=8, height=4, slots=4, safe=True)
    consumer = FrameRing.open(name, safe=True)
    mapped = FrameRing.open(name, observer=True)
    try:
        for i in range(6):
            producer.write(frame(8, 4, 4, i), timestamp_ns=100 + i)
        got = consumer.read_next()
        assert (got.seq, got.timestamp_ns, bytes(got.data)) == (3, 102, frame(8, 4, 4, 2)) and consumer.dropped == 2
        out = bytearray(8 * 4 * 4)
        assert consumer.read_latest(out=out).seq == 6 and bytes(out) == frame(8, 4, 4, 5)
        assert consumer.header_counters() == (6, 6, 4) == mapped.header_counters()
        consumer.beat("consumer")
        assert mapped.control().consumer_heartbeat_ns == consumer.control().consumer_heartbeat_ns > 0
        with pytest.raises(RingError, match="safe=True"):
            consumer.pixels_address(6)
    finally:
        mapped.close()
        consumer.close()
        producer.unlink()
        producer.close()
