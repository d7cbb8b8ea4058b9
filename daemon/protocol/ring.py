"""The shared-memory frame ring: one per direction per session, single producer, single consumer, no locks.

Stdlib only (``mmap``, ``struct``, ``os``, ``time``) and importable as a single standalone file, so the OBS script,
which runs in OBS's own Python without numpy or pyzmq, can load it by path. It must never import pydantic, numpy,
zmq or anything from sdlive. The byte layout below is the wire contract; ``docs/protocol.md`` documents it for
clients in other languages.

Layout (little-endian; offsets in bytes)::

    header (256 bytes)
      0  8s  magic            b"SDLRING\\0"
      8  u32 version          1
     12  u32 header_size      256
     16  u32 width            pixels
     20  u32 height           pixels
     24  u32 pixel_format     1 bgra, 2 rgba, 3 rgb24, 4 bgr24
     28  u32 stride           bytes per row (width * bytes per pixel, rows are packed)
     32  u32 slot_count       N
     36  u32 creator_pid      informational
     40  u64 slot_size        bytes per slot, slot header included, a multiple of 64
     48  u64 frame_size       stride * height (pixel bytes per slot)
     56  u64 write_count      sequence number of the newest published frame (0 = none yet); producer-written
     64  u64 read_count       sequence number of the last frame the consumer took; consumer-written
     72  u64 dropped          frames the consumer never saw (lapped, or skipped by read_latest); consumer-written
     80  u32 wake_flags       bit 0 FUTEX: the producer FUTEX_WAKEs write_count's low 32 bits after each publish
     84  ... reserved (zero)
    control block (at 128): what only shared memory can say, liveness and intent, with no socket involved
    128  ... reserved (zero; sdlive/1 kept in-band preset/steps requests here, see docs/protocol.md "Changes")
    152  u32 flags            bit 0 PAUSED (the producer paused on purpose: no frames is not death)
    156  u32 closed           1 = a side has closed the session; the other should let go
    160  u64 producer_heartbeat_ns   time.monotonic_ns() of the producer's last sign of life
    168  u64 consumer_heartbeat_ns   time.monotonic_ns() of the consumer's last sign of life
    176  ... reserved (zero)
    slots, slot i at 256 + i * slot_size
      0  u64 seq              seqlock word: 2n-1 while frame n is being written, 2n once frame n is complete
      8  u64 timestamp_ns     capture time of frame n, time.monotonic_ns() clock of the capturing machine
     16  u64 size             pixel bytes (= frame_size)
     24  ... reserved up to 64
     64  pixels               frame_size bytes, rows top to bottom, ``stride`` bytes each

Seqlock (frame n, 1-based, lives in slot (n - 1) % N):

* write: store seq = 2n-1; store pixels, timestamp, size; store seq = 2n; store write_count = n.
* read: s1 = seq; if s1 != 2n the slot holds another frame (or is mid-write): skip or retry. Copy pixels and
  timestamp. s2 = seq; if s2 != s1 the writer lapped us during the copy: the copy is torn, discard it.

Waking the consumer (never a busy spin): on Linux the producer calls futex(FUTEX_WAKE) on the low 32 bits of
write_count (offset 56) after publishing, and sets wake_flags bit 0; ``wait`` then blocks in futex(FUTEX_WAIT) on
that word, woken within tens of microseconds. Elsewhere, or when the producer does not set the flag, ``wait``
sleeps in short steps (``poll_s``, 0.5 ms by default) and re-reads write_count. Futex waits are bounded (50 ms),
so a producer that stops waking degrades to polling, never to a hang.

Safe access (``safe=True``, what the daemon uses): the ring's memory is read and written only with
``pread``/``pwrite`` on a kept descriptor. A mapped load of a page whose file another process truncated is a SIGBUS
that kills the whole process; a ``pread`` just comes back short (a ``RingError``). ``verify`` checks that the name
still points at the ring's file, at its size, with its header intact. Creation allocates the file's memory for real
(``posix_fallocate``), so a folder too small (Docker's 64 MB ``/dev/shm``) is a ``RingSpaceError`` at creation,
never a SIGBUS on first touch.

Memory ordering: the producer writes the pixels, then publishes the slot's seq, then write_count, in program
order. CPython cannot emit fences; on x86-64 (TSO) stores are seen in program order, so the algorithm is exact.
On weakly ordered CPUs (ARM64) the double check still catches a writer that lapped the reader, which is the
failure that matters for live video, but a stale pixel line is possible in theory.
"""

from __future__ import annotations

# No dataclasses here: they look their module up in sys.modules, which fails when a host (the OBS script) loads
# this file by path without registering it. NamedTuple has no such need.
import ctypes
import errno
import importlib.util
import math
import mmap
import os
import re
import struct
import sys
import time
from typing import NamedTuple

__all__ = [
    "FLAG_PAUSED",
    "PIXEL_FORMATS",
    "RING_MAGIC",
    "RING_VERSION",
    "ControlBlock",
    "FrameRing",
    "RingError",
    "RingSpaceError",
    "RingFrame",
    "bytes_per_pixel",
    "ring_path",
]

RING_MAGIC = b"SDLRING\x00"
RING_VERSION = 1
HEADER_SIZE = 256
SLOT_HEADER_SIZE = 64
SLOT_ALIGN = 64
MAX_SLOTS = 256
MAX_DIMENSION = 16384
MAX_FRAME_JUMP = 2**32
"""More frames than this published since the last read (200 days at 240 fps) is a corrupt header, not a writer."""

if __package__:
    from .constants import PIXEL_FORMATS
else:  # loaded by file path as a lone module: its sibling constants.py is loaded the same way
    _spec = importlib.util.spec_from_file_location(
        "_sdlive_ring_constants", os.path.join(os.path.dirname(os.path.abspath(__file__)), "constants.py")
    )
    assert _spec is not None and _spec.loader is not None
    _constants = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_constants)
    PIXEL_FORMATS = _constants.PIXEL_FORMATS

_FORMAT_BY_CODE = {info.code: name for name, info in PIXEL_FORMATS.items()}

FLAG_PAUSED = 1
WAKE_FUTEX = 1
FUTEX_WAIT_SLICE_S = 0.05  # longest single futex wait: a producer that stops waking costs at most this

# struct layouts (all little-endian); offsets of the single fields below
_STATIC = struct.Struct("<8sIIIIIIIIQQ")  # magic .. frame_size, offsets 0..55
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_SLOT_HEAD = struct.Struct("<QQQ")  # seq, timestamp_ns, size
_COUNTERS = struct.Struct("<QQQ")  # write_count, read_count, dropped (offset 56)
_CONTROL = struct.Struct("<IIQQ")  # flags, closed, producer_heartbeat_ns, consumer_heartbeat_ns (offset 152)

OFF_WRITE_COUNT = 56
OFF_READ_COUNT = 64
OFF_DROPPED = 72
OFF_WAKE_FLAGS = 80
OFF_CONTROL = 128
OFF_FLAGS = 152
OFF_CLOSED = 156
OFF_PRODUCER_HB = 160
OFF_CONSUMER_HB = 168

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_IS_WINDOWS = sys.platform == "win32"


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_futex():
    """``syscall(SYS_futex, ...)`` through ctypes on 64-bit Linux, else None (callers fall back to short sleeps)."""
    if not sys.platform.startswith("linux"):
        return None
    # SYS_futex per 64-bit architecture (asm/unistd.h); 32-bit ABIs use another timespec: not supported, they poll.
    number = {"x86_64": 202, "aarch64": 98, "arm64": 98, "riscv64": 98, "ppc64le": 221, "ppc64": 221, "s390x": 238}.get(
        os.uname().machine
    )
    if number is None or ctypes.sizeof(ctypes.c_long) != 8:
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                        ctypes.c_void_p, ctypes.c_uint32]  # fmt: skip
    return number, syscall


_FUTEX = _load_futex()
_FUTEX_WAIT = 0  # not FUTEX_PRIVATE_FLAG: the word is shared between processes
_FUTEX_WAKE = 1


class RingError(Exception):
    """The ring cannot be created, opened or used; the message names the problem and the fix."""


class RingSpaceError(RingError):
    """The ring folder cannot hold a new ring (a capacity problem: the fix is more room or a smaller ring)."""


class RingFrame(NamedTuple):
    """One frame taken from a ring.

    ``data`` is a private copy (``bytes``/``bytearray``) unless the read asked for ``copy=False``: then it is a
    read-only ``memoryview`` into the slot, and the caller must ask ``ring.still_valid(frame)`` after using it.
    """

    seq: int
    timestamp_ns: int
    data: bytes | bytearray | memoryview


class ControlBlock(NamedTuple):
    """A snapshot of the ring's control block: pause and close intent and both sides' heartbeats."""

    flags: int
    closed: bool
    producer_heartbeat_ns: int
    consumer_heartbeat_ns: int


def bytes_per_pixel(pixel_format: str) -> int:
    try:
        return PIXEL_FORMATS[pixel_format].bytes_per_pixel
    except KeyError:
        raise RingError(f"unknown pixel format {pixel_format!r}: use one of {', '.join(PIXEL_FORMATS)}") from None


def _shm_dir() -> str:
    override = os.environ.get("SDLIVE_SHM_DIR")
    if override:
        return override
    if os.path.isdir("/dev/shm"):
        return "/dev/shm"
    # macOS and other POSIX systems without /dev/shm: a per-user file under the temp dir (page-cache backed).
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"sdlive-shm-{os.getuid()}")


def ring_path(name: str) -> str:
    """Where the ring called ``name`` lives on POSIX systems (``/dev/shm/<name>`` on Linux)."""
    _check_name(name)
    return os.path.join(_shm_dir(), name)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RingError(
            f"invalid ring name {name!r}: use 1-200 characters from A-Z a-z 0-9 _ . - starting with a letter or digit"
        )


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


class FrameRing:
    """A single-producer single-consumer frame ring in shared memory. Create with ``create`` or ``open``.

    The producer calls ``write``; the consumer calls ``read_next`` (every frame, in order) or ``read_latest``
    (newest wins). Neither ever blocks on the other; ``wait`` is a short sleeping poll for consumers that have no
    ZeroMQ notification.

    ``safe=True`` (POSIX; the daemon uses it) reaches the memory only through ``pread``/``pwrite`` on a kept file
    descriptor, never through the mapping: a file that another process truncates then gives short reads (a
    :class:`RingError`), where a load from the mapping would kill the process with SIGBUS. The mapping is still
    made, for the futex address only (the kernel answers a futex on a vanished page with EFAULT, not a signal).
    """

    def __init__(
        self, name: str, mm: mmap.mmap, *, owner: bool, observer: bool = False, fd: int | None = None
    ) -> None:
        # Use create()/open(); this only wraps an already validated mapping.
        self.name = name
        self._mm = mm
        self._buf = memoryview(mm)
        self._fd = fd
        self._owner = owner
        self._observer = observer
        self._closed = False
        (
            _magic,
            _version,
            _header_size,
            self.width,
            self.height,
            code,
            self.stride,
            self.slots,
            self.creator_pid,
            self.slot_size,
            self.frame_size,
        ) = _STATIC.unpack_from(self._read_bytes(0, _STATIC.size), 0)
        self.pixel_format = _FORMAT_BY_CODE[code]
        self.channels = PIXEL_FORMATS[self.pixel_format].bytes_per_pixel
        self.total_size = HEADER_SIZE + self.slots * self.slot_size
        # The file this ring lives in (safe mode): a name that points elsewhere later was deleted or replaced.
        self._identity = None
        if fd is not None:
            st = os.fstat(fd)
            self._identity = (st.st_dev, st.st_ino)
        # The producer's next sequence number and the consumer's cursor are kept locally: the header copies are
        # for the other side and for monitoring. Opening an existing ring resumes from its counters.
        self._written = self._u64(OFF_WRITE_COUNT)
        self._cursor = self._u64(OFF_READ_COUNT)
        self._dropped = self._u64(OFF_DROPPED)
        # The mapping's address in this process. The temporary ctypes view is dropped at once (no export is held),
        # so close() can still unmap; the address is valid until then.
        self._base_addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        self._futex_addr = self._base_addr + OFF_WRITE_COUNT if _FUTEX else None
        self._wake_flag_set = False

    # ------------------------------------------------------------------ memory access (mapping or fd)

    def _read_bytes(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            return bytes(self._buf[offset : offset + size])
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise self._truncated()
        return data

    def _write_bytes(self, offset: int, data) -> None:
        if self._fd is None:
            self._buf[offset : offset + len(data)] = data
            return
        view = memoryview(data)
        if os.pwrite(self._fd, view, offset) != view.nbytes:
            raise self._truncated()

    def _u64(self, offset: int) -> int:
        if self._fd is None:
            return _U64.unpack_from(self._buf, offset)[0]
        return _U64.unpack(self._read_bytes(offset, 8))[0]

    def _set_u64(self, offset: int, value: int) -> None:
        if self._fd is None:
            _U64.pack_into(self._buf, offset, value)
        else:
            self._write_bytes(offset, _U64.pack(value))

    def _u32(self, offset: int) -> int:
        if self._fd is None:
            return _U32.unpack_from(self._buf, offset)[0]
        return _U32.unpack(self._read_bytes(offset, 4))[0]

    def _set_u32(self, offset: int, value: int) -> None:
        if self._fd is None:
            _U32.pack_into(self._buf, offset, value)
        else:
            self._write_bytes(offset, _U32.pack(value))

    def _slot_head(self, base: int) -> tuple[int, int, int]:
        if self._fd is None:
            return _SLOT_HEAD.unpack_from(self._buf, base)
        return _SLOT_HEAD.unpack_from(self._read_bytes(base, _SLOT_HEAD.size), 0)

    def _truncated(self) -> RingError:
        size = self._file_size()
        return RingError(
            f"ring {self.name!r} was truncated to {size} bytes, it needs {self.total_size}: another process shrank "
            "its file (only the daemon may size a ring); open a new session"
        )

    def _file_size(self) -> int:
        return os.fstat(self._fd).st_size if self._fd is not None else len(self._mm)

    def _check_size(self) -> None:
        """Safe mode, before each access window: a shrunk file is named as such (short reads would say less)."""
        if self._fd is not None and os.fstat(self._fd).st_size < self.total_size:
            raise self._truncated()

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls, name: str, *, width: int, height: int, pixel_format: str = "bgra", slots: int = 4, safe: bool = False
    ) -> FrameRing:
        """Create a new ring (the daemon does this). Fails if a ring of that name exists, and, with a clear
        :class:`RingError`, when the ring folder cannot hold it: the memory is allocated for real here, never
        left sparse to fail (with SIGBUS) on first use."""
        _check_name(name)
        info = PIXEL_FORMATS.get(pixel_format)
        if info is None:
            raise RingError(f"unknown pixel format {pixel_format!r}: use one of {', '.join(PIXEL_FORMATS)}")
        code, bpp = info.code, info.bytes_per_pixel
        for label, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or not 1 <= value <= MAX_DIMENSION:
                raise RingError(f"ring {label} must be an int in 1..{MAX_DIMENSION}, got {value!r}")
        if not isinstance(slots, int) or not 2 <= slots <= MAX_SLOTS:
            raise RingError(f"ring slots must be an int in 2..{MAX_SLOTS}, got {slots!r}")
        stride = width * bpp
        frame_size = stride * height
        slot_size = _round_up(SLOT_HEADER_SIZE + frame_size, SLOT_ALIGN)
        total = HEADER_SIZE + slots * slot_size

        kept_fd: int | None = None
        if _IS_WINDOWS:
            mm = mmap.mmap(-1, total, tagname=name)  # type: ignore[call-arg]  # Windows-only argument
            if any(mm[:8]):  # a named mapping that already exists is opened, not created
                mm.close()
                raise RingError(f"ring {name!r} already exists: close the session that owns it or pick another name")
        else:
            directory = _shm_dir()
            os.makedirs(directory, mode=0o700, exist_ok=True)
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                raise RingError(
                    f"ring {name!r} already exists at {path}: close the session that owns it or remove the stale file"
                ) from None
            try:
                os.fchmod(fd, 0o600)  # owner only, whatever the umask
                os.ftruncate(fd, total)
                _allocate(fd, total, name, directory)
                mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            if safe:
                kept_fd = fd
            else:
                os.close(fd)  # the mapping keeps the memory; the name stays until unlink()

        # Everything but the magic first, the magic last: a client that opens a half-built ring sees no magic.
        static = _STATIC.pack(
            b"\x00" * 8,
            RING_VERSION,
            HEADER_SIZE,
            width,
            height,
            code,
            stride,
            slots,
            os.getpid() & 0xFFFFFFFF,
            slot_size,
            frame_size,
        )
        if kept_fd is None:
            mm[0 : len(static)] = static
            mm[0:8] = RING_MAGIC
        else:
            os.pwrite(kept_fd, static, 0)
            os.pwrite(kept_fd, RING_MAGIC, 0)
        return cls(name, mm, owner=True, fd=kept_fd)

    @classmethod
    def open(cls, name: str, *, observer: bool = False, safe: bool = False) -> FrameRing:
        """Open a ring another process created. ``observer=True`` reads without updating the consumer counters
        (a second watcher, e.g. a virtual camera mirroring an OBS filter's output). ``safe=True``: see the class
        docstring (POSIX only; ignored on Windows, whose named mappings cannot shrink)."""
        _check_name(name)
        kept_fd: int | None = None
        if _IS_WINDOWS:
            probe = mmap.mmap(-1, HEADER_SIZE, tagname=name)  # type: ignore[call-arg]  # Windows-only argument
            try:
                total = _validate_header(name, probe[:HEADER_SIZE], None)
            finally:
                probe.close()
            mm = mmap.mmap(-1, total, tagname=name)  # type: ignore[call-arg]  # Windows-only argument
        else:
            path = ring_path(name)
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                raise RingError(
                    f"ring {name!r} not found at {path}: open the session first (the daemon creates the rings)"
                ) from None
            except PermissionError:
                raise RingError(f"no permission to open ring {name!r} at {path}: run as the daemon's user") from None
            try:
                size = os.fstat(fd).st_size
                if size < HEADER_SIZE:
                    raise RingError(
                        f"ring {name!r} is corrupt: {size} bytes is smaller than the {HEADER_SIZE}-byte header"
                    )
                # The header is read through the descriptor: the file may shrink between fstat and a mapped load.
                header = os.pread(fd, HEADER_SIZE, 0)
                _validate_header(name, header, size)
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                raise
            if safe:
                kept_fd = fd
            else:
                os.close(fd)
        return cls(name, mm, owner=False, observer=observer, fd=kept_fd)

    # ------------------------------------------------------------------ producer

    def write(self, pixels, *, timestamp_ns: int | None = None) -> int:
        """Publish one frame (any C-contiguous bytes-like of ``frame_size`` bytes). Never blocks: an unread
        frame that is lapped is the consumer's drop. Returns the frame's sequence number (1, 2, ...)."""
        self._check_open()
        view = memoryview(pixels)
        if view.nbytes != self.frame_size:
            raise ValueError(
                f"frame is {view.nbytes} bytes, ring {self.name!r} takes {self.frame_size} "
                f"({self.width}x{self.height} {self.pixel_format})"
            )
        if not view.c_contiguous:
            raise ValueError("frame is not C-contiguous: pass a contiguous buffer (numpy: np.ascontiguousarray)")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if timestamp_ns is None:
            timestamp_ns = time.monotonic_ns()
        self._check_size()
        n = self._written + 1
        base = HEADER_SIZE + ((n - 1) % self.slots) * self.slot_size
        self._set_u64(base, 2 * n - 1)  # odd: slot n is being written
        self._write_bytes(base + SLOT_HEADER_SIZE, view)
        self._write_bytes(base + 8, _U64.pack(timestamp_ns) + _U64.pack(self.frame_size))
        self._set_u64(base, 2 * n)  # even: frame n complete (published after the pixels)
        self._set_u64(OFF_WRITE_COUNT, n)
        self._set_u64(OFF_PRODUCER_HB, time.monotonic_ns())
        self._written = n
        if self._futex_addr is not None:
            if not self._wake_flag_set:
                self._set_u32(OFF_WAKE_FLAGS, self._u32(OFF_WAKE_FLAGS) | WAKE_FUTEX)
                self._wake_flag_set = True
            # ~1 us with nobody waiting; wakes every waiter of the word (the consumer and any observer)
            _FUTEX[1](_FUTEX[0], self._futex_addr, _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)
        return n

    # ------------------------------------------------------------------ consumer

    def _newest(self) -> int:
        """write_count, checked: a jump no producer can make (2**32 frames since the last read) is corruption."""
        newest = self._u64(OFF_WRITE_COUNT)
        if newest > self._cursor + MAX_FRAME_JUMP:
            raise RingError(
                f"ring {self.name!r} is corrupt: write_count jumped from {self._cursor} to {newest} "
                "(something other than its producer wrote the header); open a new session"
            )
        return newest

    def read_next(self, *, copy: bool = True, out=None) -> RingFrame | None:
        """The next frame in order, or None when there is none yet. When the writer has lapped the reader, skip
        to the oldest frame still in the ring and count the skipped ones as dropped."""
        self._check_open()
        self._check_size()
        while True:
            newest = self._newest()
            if newest <= self._cursor:
                self._beat_consumer()
                return None
            want = self._cursor + 1
            oldest = newest - self.slots + 1
            if want < oldest:
                self._skip_to(oldest)
                want = oldest
            frame = self._take(want, copy=copy, out=out)
            if frame is not None:
                self._consumed(want)
                return frame
            # Lapped while copying: frame `want` is gone. Count it, move on to what is still there.
            self._skip_to(want + 1)

    def read_latest(self, *, copy: bool = True, out=None) -> RingFrame | None:
        """The newest frame not read yet, or None. Older unread frames are skipped and counted as dropped."""
        self._check_open()
        self._check_size()
        for _attempt in range(self.slots + 2):
            newest = self._newest()
            if newest <= self._cursor:
                self._beat_consumer()
                return None
            frame = self._take(newest, copy=copy, out=out)
            if frame is not None:
                self._skip_to(newest)
                self._consumed(newest)
                return frame
        return None  # the writer kept lapping us (a writer this fast makes every read torn): try again later

    def still_valid(self, frame: RingFrame) -> bool:
        """After using a ``copy=False`` frame: True when the writer has not touched its slot since it was read."""
        base = HEADER_SIZE + ((frame.seq - 1) % self.slots) * self.slot_size
        return self._u64(base) == 2 * frame.seq

    def pixels_address(self, seq: int) -> int:
        """Address, in this process, of the pixels of the slot that holds frame ``seq``: for C APIs that upload
        straight from shared memory (``gs_texture_set_image``). Valid while the ring is open; as with a
        ``copy=False`` read, ask ``still_valid`` after use. Not in safe mode (it hands out the mapping)."""
        self._check_open()
        if self._fd is not None:
            raise RingError(f"ring {self.name!r} was opened safe=True: it hands out no addresses into the mapping")
        return self._base_addr + HEADER_SIZE + ((seq - 1) % self.slots) * self.slot_size + SLOT_HEADER_SIZE

    def wait(self, timeout_s: float, *, poll_s: float = 0.0005, futex: bool = True) -> bool:
        """Block until a frame newer than the last one read is published, at most ``timeout_s``; True if one was.

        Never a busy spin: a futex wait on Linux when the producer wakes it (see the module docstring), else
        sleeps of ``poll_s``. ``futex=False`` forces the sleeping poll."""
        self._check_open()
        deadline = time.monotonic() + timeout_s
        use_futex = futex and self._futex_addr is not None
        while True:
            newest = self._u64(OFF_WRITE_COUNT)
            if newest > self._cursor:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if use_futex and self._u32(OFF_WAKE_FLAGS) & WAKE_FUTEX:
                slice_s = min(remaining, FUTEX_WAIT_SLICE_S)
                spec = _Timespec(int(slice_s), int((slice_s % 1.0) * 1e9))
                # Sleeps only while the word still equals what we just read: no lost wake-up (EAGAIN otherwise).
                _FUTEX[1](_FUTEX[0], self._futex_addr, _FUTEX_WAIT, newest & 0xFFFFFFFF, ctypes.byref(spec), None, 0)
            else:
                time.sleep(min(poll_s, remaining))

    def _take(self, n: int, *, copy: bool, out) -> RingFrame | None:
        base = HEADER_SIZE + ((n - 1) % self.slots) * self.slot_size
        s1, timestamp_ns, size = self._slot_head(base)
        if s1 != 2 * n or size != self.frame_size:
            return None  # mid-write, or already overwritten by a newer frame
        start = base + SLOT_HEADER_SIZE
        data: bytes | bytearray | memoryview
        if out is not None:
            target = memoryview(out).cast("B")  # flat bytes, whatever the out buffer's shape (H×W×C arrays too)
            if target.nbytes != self.frame_size:
                raise ValueError(f"out buffer is {target.nbytes} bytes, ring frames are {self.frame_size}")
            if self._fd is None:
                target[:] = self._buf[start : start + self.frame_size]
            elif os.preadv(self._fd, [target], start) != self.frame_size:
                raise self._truncated()
            data = out
        elif self._fd is not None:  # safe mode has no views into the mapping: copy=False copies too
            data = self._read_bytes(start, self.frame_size)
        elif copy:
            data = self._mm[start : start + self.frame_size]  # one memcpy into a new bytes object
        else:
            data = self._buf[start : start + self.frame_size].toreadonly()
        if self._u64(base) != s1:
            return None  # torn: the writer came back to this slot during the copy
        return RingFrame(n, timestamp_ns, data)

    def _skip_to(self, n: int) -> None:
        """Mark frames (cursor, n) as never seen."""
        if n - 1 > self._cursor:
            self._dropped += n - 1 - self._cursor
            self._cursor = n - 1
            if not self._observer:
                self._set_u64(OFF_DROPPED, self._dropped)

    def _consumed(self, n: int) -> None:
        self._cursor = n
        if not self._observer:
            self._set_u64(OFF_READ_COUNT, n)
            self._set_u64(OFF_CONSUMER_HB, time.monotonic_ns())

    def _beat_consumer(self) -> None:
        if not self._observer:
            self._set_u64(OFF_CONSUMER_HB, time.monotonic_ns())

    # ------------------------------------------------------------------ counters

    @property
    def written(self) -> int:
        """Frames published so far (the newest frame's sequence number)."""
        return self._u64(OFF_WRITE_COUNT)

    @property
    def read(self) -> int:
        """Sequence number of the last frame this reader took (for the consumer, the header's read_count)."""
        return self._cursor

    @property
    def dropped(self) -> int:
        """Frames this reader never saw: lapped by the writer or skipped by read_latest."""
        return self._dropped

    @property
    def pending(self) -> int:
        """Frames published and not read yet (can exceed ``slots``: the excess is already lost)."""
        return max(0, self.written - self._cursor)

    def header_counters(self) -> tuple[int, int, int]:
        """(write_count, read_count, dropped) as stored in the header, whoever wrote them."""
        return _COUNTERS.unpack(self._read_bytes(OFF_WRITE_COUNT, _COUNTERS.size))

    # ------------------------------------------------------------------ control block

    def control(self) -> ControlBlock:
        """A snapshot of the control block (each field is one aligned word: no seqlock needed)."""
        self._check_open()
        flags, closed, producer_hb, consumer_hb = _CONTROL.unpack(self._read_bytes(OFF_FLAGS, _CONTROL.size))
        return ControlBlock(
            flags=flags, closed=bool(closed), producer_heartbeat_ns=producer_hb, consumer_heartbeat_ns=consumer_hb
        )

    @property
    def flags(self) -> int:
        return self._u32(OFF_FLAGS)

    @flags.setter
    def flags(self, value: int) -> None:
        self._set_u32(OFF_FLAGS, value & 0xFFFFFFFF)

    def beat(self, role: str) -> None:
        """Record a sign of life for ``role`` ("producer" or "consumer") without moving a frame."""
        if role not in ("producer", "consumer"):
            raise ValueError(f"role must be 'producer' or 'consumer', got {role!r}")
        self._set_u64(OFF_PRODUCER_HB if role == "producer" else OFF_CONSUMER_HB, time.monotonic_ns())

    def heartbeat_age_s(self, role: str) -> float:
        """Seconds since ``role``'s last sign of life (inf if it never showed one)."""
        stamp = self._u64(OFF_PRODUCER_HB if role == "producer" else OFF_CONSUMER_HB)
        return math.inf if stamp == 0 else max(0.0, (time.monotonic_ns() - stamp) / 1e9)

    @property
    def closed_flag(self) -> bool:
        """True once either side called ``mark_closed``: the session is over, let go of the ring."""
        return bool(self._u32(OFF_CLOSED))

    def mark_closed(self) -> None:
        self._set_u32(OFF_CLOSED, 1)

    # ------------------------------------------------------------------ integrity (safe mode)

    def verify(self) -> None:
        """Raise :class:`RingError` naming the fault when the ring's file was truncated, deleted or replaced
        (:meth:`verify_file`) or its header no longer describes this ring (:meth:`verify_header`). Safe mode only:
        it reads through the descriptor."""
        self.verify_file()
        self.verify_header()

    def verify_file(self) -> None:
        """The ring's name still points at this ring's file, and the file still has its size (safe mode)."""
        self._check_open()
        if self._fd is None:
            raise RingError(f"ring {self.name!r}: verify() needs a ring created or opened with safe=True")
        self._check_size()
        path = ring_path(self.name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise RingError(
                f"ring {self.name!r} was deleted from {os.path.dirname(path)} while in use: another process removed "
                "it (only the daemon unlinks rings); open a new session"
            ) from None
        if (st.st_dev, st.st_ino) != self._identity:
            raise RingError(f"ring {self.name!r} at {path} was replaced by another file while in use; open a new session")

    def verify_header(self) -> None:
        """The header still passes every check and still describes this ring (safe mode)."""
        self._check_open()
        if self._fd is None:
            raise RingError(f"ring {self.name!r}: verify() needs a ring created or opened with safe=True")
        header = self._read_bytes(0, HEADER_SIZE)
        _validate_header(self.name, header, self._file_size())
        geometry = _STATIC.unpack_from(header, 0)[3:]
        expected = (self.width, self.height, PIXEL_FORMATS[self.pixel_format].code, self.stride, self.slots,
                    self.creator_pid, self.slot_size, self.frame_size)  # fmt: skip
        if geometry != expected:
            raise RingError(f"ring {self.name!r} is corrupt: its header changed from {expected} to {geometry}")

    # ------------------------------------------------------------------ teardown

    @property
    def is_open(self) -> bool:
        return not self._closed

    def close(self) -> None:
        """Unmap this process's view (idempotent). The ring itself lives on until ``unlink``."""
        if self._closed:
            return
        self._closed = True
        self._buf.release()
        try:
            self._mm.close()
        except BufferError:
            # A copy=False frame is still held somewhere; the mapping goes when it is garbage collected.
            pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def unlink(self) -> None:
        """Remove the ring's name (``/dev/shm/<name>``); mapped views stay valid until closed. In safe mode a name
        that now points at another file is left alone (it is not this ring). Windows frees a named mapping when
        its last handle closes, so there this only closes."""
        if _IS_WINDOWS:
            self.close()
            return
        path = ring_path(self.name)
        try:
            if self._identity is not None:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) != self._identity:
                    return
            os.unlink(path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> FrameRing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"written={self._written} read={self._cursor} dropped={self._dropped}"
        return f"FrameRing({self.name!r}, {self.width}x{self.height} {self.pixel_format}, slots={self.slots}, {state})"

    def _check_open(self) -> None:
        if self._closed:
            raise RingError(f"ring {self.name!r} is closed")


def _allocate(fd: int, size: int, name: str, directory: str) -> None:
    """Give the ring's file real memory now (tmpfs files are sparse: a page that cannot be found on first touch
    is a SIGBUS). A folder too small for it is a RingError naming the folder and the fix."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # macOS: write the zeros (no posix_fallocate in os there)
            chunk = bytes(1 << 20)
            for offset in range(0, size, len(chunk)):
                os.pwrite(fd, chunk[: min(len(chunk), size - offset)], offset)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        try:
            vfs = os.statvfs(directory)
            room = f"{vfs.f_bavail * vfs.f_frsize / 2**20:.1f} MiB free of {vfs.f_blocks * vfs.f_frsize / 2**20:.0f} MiB"
        except OSError:
            room = "its free space unknown"
        raise RingSpaceError(
            f"the ring folder {directory} cannot hold ring {name!r} ({size / 2**20:.1f} MiB; {room}): give it more "
            "room (Docker: docker run --shm-size=1g), set SDLIVE_SHM_DIR to a larger tmpfs, or open a smaller or "
            "slower session (fewer pixels, --ring-slots)"
        ) from None


def _validate_header(name: str, header: bytes, size: int | None) -> int:
    """Check a header read from shared memory; return the ring's total size. Raises RingError naming the fault."""
    (magic, version, header_size, width, height, code, stride, slots, _pid, slot_size, frame_size) = (
        _STATIC.unpack_from(header, 0)
    )
    where = f"ring {name!r} is corrupt"
    if magic != RING_MAGIC:
        if magic == b"\x00" * 8:
            if _IS_WINDOWS:  # opening a tagname that does not exist creates an empty mapping
                raise RingError(f"ring {name!r} not found (or not initialised yet): open the session first")
            raise RingError(f"ring {name!r} is not initialised (no magic): it is being created or its creator died")
        raise RingError(f"{where}: bad magic {magic!r}, expected {RING_MAGIC!r} (not an sdlive ring)")
    if version != RING_VERSION:
        raise RingError(
            f"ring {name!r} has layout version {version}, this client speaks {RING_VERSION}: "
            "upgrade sdlive on both sides"
        )
    if header_size != HEADER_SIZE:
        raise RingError(f"{where}: header_size {header_size}, expected {HEADER_SIZE}")
    if code not in _FORMAT_BY_CODE:
        raise RingError(f"{where}: unknown pixel format code {code}")
    if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
        raise RingError(f"{where}: size {width}x{height} outside 1..{MAX_DIMENSION}")
    bpp = PIXEL_FORMATS[_FORMAT_BY_CODE[code]].bytes_per_pixel
    if stride != width * bpp:
        raise RingError(f"{where}: stride {stride} != width {width} * {bpp} bytes per pixel")
    if frame_size != stride * height:
        raise RingError(f"{where}: frame_size {frame_size} != stride {stride} * height {height}")
    if not 2 <= slots <= MAX_SLOTS:
        raise RingError(f"{where}: slot count {slots} outside 2..{MAX_SLOTS}")
    if slot_size < SLOT_HEADER_SIZE + frame_size or slot_size % SLOT_ALIGN:
        raise RingError(f"{where}: slot_size {slot_size} cannot hold a {frame_size}-byte frame")
    total = HEADER_SIZE + slots * slot_size
    if size is not None and size < total:
        raise RingError(f"{where}: {size} bytes, the header describes {total} (truncated)")
    return total
