"""Frames across machines: a fixed 40-byte header frame, then the pixels (raw or JPEG), over ZeroMQ.

The same semantics as the ring (sequence numbers, capture timestamps, pixel formats) for dual-PC setups where
shared memory cannot reach. Raw frames travel zero-copy (``copy=False``); JPEG uses OpenCV, imported only when a
JPEG frame is encoded or decoded. Layout (little-endian)::

     0  4s  magic         b"SDLF"
     4  u8  version       1
     5  u8  pixel_format  1 bgra, 2 rgba, 3 rgb24, 4 bgr24 (the ring's codes)
     6  u8  encoding      0 raw, 1 jpeg
     7  u8  flags         0 (reserved)
     8  u64 seq           the sender's frame sequence number (1, 2, ...)
    16  u64 timestamp_ns  capture time on the capturing machine's monotonic clock (echoed back on outputs)
    24  u32 width
    28  u32 height
    32  u64 size          payload bytes (raw: width * height * bytes per pixel)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from .constants import PIXEL_FORMATS
from .errors import ErrorCode, ProtocolError

__all__ = [
    "ENCODINGS",
    "NETFRAME_HEADER_SIZE",
    "NETFRAME_MAGIC",
    "NetFrameError",
    "NetFrameHeader",
    "decode_frame",
    "encode_frame",
    "recv_frame",
    "send_frame",
]

NETFRAME_MAGIC = b"SDLF"
NETFRAME_VERSION = 1
_HEADER = struct.Struct("<4sBBBBQQIIQ")
NETFRAME_HEADER_SIZE = _HEADER.size  # 40
ENCODINGS: dict[str, int] = {"raw": 0, "jpeg": 1}
_ENCODING_BY_CODE = {code: name for name, code in ENCODINGS.items()}
_FORMAT_BY_CODE = {info.code: name for name, info in PIXEL_FORMATS.items()}
MAX_NET_DIMENSION = 16384
DEFAULT_JPEG_QUALITY = 90


class NetFrameError(ProtocolError):
    """A network frame that cannot be decoded (code ``bad_request``); the message names the fault."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_REQUEST, message)


@dataclass(frozen=True)
class NetFrameHeader:
    seq: int
    timestamp_ns: int
    width: int
    height: int
    pixel_format: str
    encoding: str
    size: int

    @property
    def channels(self) -> int:
        return PIXEL_FORMATS[self.pixel_format].bytes_per_pixel

    def pack(self) -> bytes:
        return _HEADER.pack(
            NETFRAME_MAGIC,
            NETFRAME_VERSION,
            PIXEL_FORMATS[self.pixel_format].code,
            ENCODINGS[self.encoding],
            0,
            self.seq,
            self.timestamp_ns,
            self.width,
            self.height,
            self.size,
        )

    @classmethod
    def unpack(cls, buf: Any) -> NetFrameHeader:
        view = memoryview(buf)
        if view.nbytes != NETFRAME_HEADER_SIZE:
            raise NetFrameError(f"frame header is {view.nbytes} bytes, expected {NETFRAME_HEADER_SIZE}")
        magic, version, fmt, enc, _flags, seq, ts, width, height, size = _HEADER.unpack(view.cast("B"))
        if magic != NETFRAME_MAGIC:
            raise NetFrameError(f"bad frame magic {magic!r}, expected {NETFRAME_MAGIC!r} (not an sdlive frame)")
        if version != NETFRAME_VERSION:
            raise NetFrameError(f"frame header version {version}, this side speaks {NETFRAME_VERSION}: upgrade sdlive")
        if fmt not in _FORMAT_BY_CODE:
            raise NetFrameError(f"unknown pixel format code {fmt} in frame header")
        if enc not in _ENCODING_BY_CODE:
            raise NetFrameError(f"unknown encoding code {enc} in frame header")
        if not (1 <= width <= MAX_NET_DIMENSION and 1 <= height <= MAX_NET_DIMENSION):
            raise NetFrameError(f"frame size {width}x{height} outside 1..{MAX_NET_DIMENSION}")
        header = cls(seq, ts, width, height, _FORMAT_BY_CODE[fmt], _ENCODING_BY_CODE[enc], size)
        if header.encoding == "raw" and size != width * height * header.channels:
            raise NetFrameError(
                f"raw frame header says {size} bytes, {width}x{height} {header.pixel_format} is "
                f"{width * height * header.channels}"
            )
        return header


def _check_pixels(pixels: np.ndarray, pixel_format: str) -> np.ndarray:
    if pixel_format not in PIXEL_FORMATS:
        raise ValueError(f"unknown pixel format {pixel_format!r}: use one of {', '.join(PIXEL_FORMATS)}")
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"frame must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"unexpected frame dtype: {pixels.dtype} != uint8")
    channels = PIXEL_FORMATS[pixel_format].bytes_per_pixel
    if pixels.ndim != 3 or pixels.shape[2] != channels:
        raise ValueError(f"unexpected frame shape {pixels.shape}: {pixel_format} frames are HxWx{channels}")
    return np.ascontiguousarray(pixels)


_TO_BGR = {"bgr24": None, "rgb24": "COLOR_RGB2BGR", "bgra": "COLOR_BGRA2BGR", "rgba": "COLOR_RGBA2BGR"}
_FROM_BGR = {"bgr24": None, "rgb24": "COLOR_BGR2RGB", "bgra": "COLOR_BGR2BGRA", "rgba": "COLOR_BGR2RGBA"}


def _cv2():
    try:
        import cv2
    except ImportError:  # pragma: no cover - opencv-python-headless is a dependency
        raise RuntimeError("JPEG frames need OpenCV: pip install opencv-python-headless") from None
    return cv2


def encode_frame(
    pixels: np.ndarray,
    *,
    seq: int,
    timestamp_ns: int,
    pixel_format: str,
    encoding: str = "raw",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> tuple[bytes, memoryview | bytes]:
    """(header bytes, payload) for one HxWxC uint8 frame. A raw payload is a view of ``pixels`` (no copy)."""
    pixels = _check_pixels(pixels, pixel_format)
    if encoding == "raw":
        payload: memoryview | bytes = memoryview(pixels.data).cast("B")
    elif encoding == "jpeg":
        cv2 = _cv2()
        conversion = _TO_BGR[pixel_format]
        bgr = pixels if conversion is None else cv2.cvtColor(pixels, getattr(cv2, conversion))
        ok, encoded = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(jpeg_quality)])
        if not ok:
            raise ValueError(f"OpenCV could not JPEG-encode a {pixels.shape} frame")
        payload = encoded.tobytes()
    else:
        raise ValueError(f"unknown encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    height, width = pixels.shape[:2]
    header = NetFrameHeader(seq, timestamp_ns, width, height, pixel_format, encoding, len(payload))
    return header.pack(), payload


def decode_frame(header: Any, payload: Any) -> tuple[NetFrameHeader, np.ndarray]:
    """(header, HxWxC uint8 frame). A raw frame is a read-only view of ``payload`` (no copy); a JPEG frame is
    decoded and converted to the header's pixel format (alpha 255)."""
    info = NetFrameHeader.unpack(header)
    data = memoryview(payload).cast("B") if memoryview(payload).format != "B" else memoryview(payload)
    if data.nbytes != info.size:
        raise NetFrameError(f"frame payload is {data.nbytes} bytes, its header says {info.size}")
    if info.encoding == "raw":
        pixels = np.frombuffer(data, dtype=np.uint8).reshape(info.height, info.width, info.channels)
        return info, pixels
    cv2 = _cv2()
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise NetFrameError("JPEG payload could not be decoded")
    if bgr.shape[:2] != (info.height, info.width):
        raise NetFrameError(f"JPEG is {bgr.shape[1]}x{bgr.shape[0]}, its header says {info.width}x{info.height}")
    conversion = _FROM_BGR[info.pixel_format]
    pixels = bgr if conversion is None else cv2.cvtColor(bgr, getattr(cv2, conversion))
    return info, pixels


def send_frame(
    socket: zmq.Socket,
    pixels: np.ndarray,
    *,
    seq: int,
    timestamp_ns: int,
    pixel_format: str,
    encoding: str = "raw",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    flags: int = 0,
    track: bool = False,
) -> zmq.MessageTracker | None:
    """Send ``[header, pixels]`` on ``socket``; raw pixels go zero-copy, so with ``track=True`` keep ``pixels``
    unchanged until the returned tracker is done (vLLM's pending_messages pattern). ``flags=zmq.NOBLOCK`` raises
    ``zmq.Again`` when the peer is not keeping up: drop the frame (newest wins)."""
    head, payload = encode_frame(
        pixels,
        seq=seq,
        timestamp_ns=timestamp_ns,
        pixel_format=pixel_format,
        encoding=encoding,
        jpeg_quality=jpeg_quality,
    )
    return socket.send_multipart([head, payload], flags=flags, copy=False, track=track)


def recv_frame(socket: zmq.Socket, flags: int = 0) -> tuple[NetFrameHeader, np.ndarray]:
    """Receive one ``[header, pixels]`` message (zero-copy for raw frames). Raises ``NetFrameError`` on a
    malformed message and ``zmq.Again`` with ``flags=zmq.NOBLOCK`` when none is waiting."""
    parts = socket.recv_multipart(flags=flags, copy=False)
    if len(parts) != 2:
        raise NetFrameError(f"frame message must have 2 parts [header, pixels], got {len(parts)}")
    return decode_frame(parts[0].buffer, parts[1].buffer)
