"""Frames across machines: a fixed 40-byte header frame, then the pixels (raw or JPEG), over ZeroMQ.

The same semantics as the ring (sequence numbers, capture timestamps, pixel formats) for dual-PC setups where
shared memory cannot reach. Raw frames travel zero-copy (``copy=False``); JPEG and PNG use OpenCV, imported only
when such a frame is encoded or decoded. A receiver checks a compressed frame before decoding it
(:func:`check_frame`): the image size is read from the JPEG/PNG header itself and must be what the frame header
says, so a tiny payload that declares a huge image costs a few header bytes, never a decode. Layout
(little-endian)::

     0  4s  magic         b"SDLF"
     4  u8  version       1
     5  u8  pixel_format  1 bgra, 2 rgba, 3 rgb24, 4 bgr24 (the ring's codes)
     6  u8  encoding      0 raw, 1 jpeg, 2 png
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
    "check_frame",
    "compressed_size",
    "decode_frame",
    "decode_payload",
    "encode_frame",
    "recv_frame",
    "send_frame",
]

NETFRAME_MAGIC = b"SDLF"
NETFRAME_VERSION = 1
_HEADER = struct.Struct("<4sBBBBQQIIQ")
NETFRAME_HEADER_SIZE = _HEADER.size  # 40
ENCODINGS: dict[str, int] = {"raw": 0, "jpeg": 1, "png": 2}
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
    elif encoding == "png":
        cv2 = _cv2()
        conversion = _TO_BGR[pixel_format]
        bgr = pixels if conversion is None else cv2.cvtColor(pixels, getattr(cv2, conversion))
        ok, encoded = cv2.imencode(".png", bgr, [int(cv2.IMWRITE_PNG_COMPRESSION), 1])
        if not ok:
            raise ValueError(f"OpenCV could not PNG-encode a {pixels.shape} frame")
        payload = encoded.tobytes()
    else:
        raise ValueError(f"unknown encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    height, width = pixels.shape[:2]
    header = NetFrameHeader(seq, timestamp_ns, width, height, pixel_format, encoding, len(payload))
    return header.pack(), payload


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def compressed_size(data: Any, encoding: str) -> tuple[int, int]:
    """(width, height) of a JPEG or PNG image, read from its own header (the JPEG frame marker, the PNG IHDR
    chunk) without decoding it. Raises :class:`NetFrameError` when the payload is not a well-formed image of that
    kind: whatever OpenCV would decode must be what was declared (it sniffs formats, so a "jpeg" frame holding a
    PNG, TIFF or anything else is refused here)."""
    view = memoryview(data).cast("B") if memoryview(data).format != "B" else memoryview(data)
    if encoding == "png":
        head = bytes(view[:24])
        if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
            raise NetFrameError("png payload does not start with a PNG signature and IHDR chunk")
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    if encoding != "jpeg":
        raise NetFrameError(f"encoding {encoding!r} has no image header to read")
    size = view.nbytes
    if size < 4 or view[0] != 0xFF or view[1] != 0xD8:
        raise NetFrameError("jpeg payload does not start with a JPEG SOI marker (FF D8)")
    pos = 2
    while pos + 4 <= size:  # bounded: every step moves forward by at least 2 bytes
        if view[pos] != 0xFF:
            raise NetFrameError(f"jpeg payload: no marker at byte {pos} before the frame header")
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            break
        length = (view[pos + 2] << 8) | view[pos + 3]
        if length < 2:
            raise NetFrameError(f"jpeg payload: marker FF {marker:02X} at byte {pos} has length {length}")
        if marker in _JPEG_SOF:
            if pos + 9 > size:
                break
            height = (view[pos + 5] << 8) | view[pos + 6]
            width = (view[pos + 7] << 8) | view[pos + 8]
            return width, height
        pos += 2 + length
    raise NetFrameError("jpeg payload has no frame header (SOF) before its scan data")


def check_frame(
    header: Any, payload: Any, *, width: int, height: int, pixel_format: str
) -> tuple[NetFrameHeader, memoryview]:
    """Check one received ``[header, payload]`` against the session's geometry *before any decoding*: the header
    (:meth:`NetFrameHeader.unpack`), its size and format, the payload's length and, for JPEG/PNG, the image size
    its own header declares (:func:`compressed_size`). Returns the header and the payload as bytes; raises
    :class:`NetFrameError` naming the first mismatch. Cost: a few dozen header bytes whatever the payload says."""
    info = NetFrameHeader.unpack(header)
    if (info.width, info.height) != (width, height) or info.pixel_format != pixel_format:
        raise NetFrameError(
            f"frame is {info.width}x{info.height} {info.pixel_format}, the session is {width}x{height} {pixel_format}"
        )
    data = memoryview(payload).cast("B") if memoryview(payload).format != "B" else memoryview(payload)
    if data.nbytes != info.size:
        raise NetFrameError(f"frame payload is {data.nbytes} bytes, its header says {info.size}")
    if info.encoding != "raw":
        raw_size = width * height * info.channels
        if data.nbytes > raw_size + 65536:
            raise NetFrameError(f"{info.encoding} payload of {data.nbytes} bytes is larger than the raw frame")
        declared = compressed_size(data, info.encoding)
        if declared != (width, height):
            raise NetFrameError(
                f"{info.encoding} image is {declared[0]}x{declared[1]}, its frame header says {width}x{height}"
            )
    return info, data


def decode_payload(info: NetFrameHeader, data: Any) -> np.ndarray:
    """The HxWxC uint8 frame of a payload already checked by :func:`check_frame` (raw: a read-only view, no copy;
    JPEG/PNG: decoded and converted to the header's pixel format, alpha 255)."""
    view = memoryview(data).cast("B") if memoryview(data).format != "B" else memoryview(data)
    if info.encoding == "raw":
        return np.frombuffer(view, dtype=np.uint8).reshape(info.height, info.width, info.channels)
    cv2 = _cv2()
    bgr = cv2.imdecode(np.frombuffer(view, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise NetFrameError(f"{info.encoding} payload could not be decoded")
    if bgr.shape[:2] != (info.height, info.width):
        raise NetFrameError(
            f"{info.encoding} decoded to {bgr.shape[1]}x{bgr.shape[0]}, its header says {info.width}x{info.height}"
        )
    conversion = _FROM_BGR[info.pixel_format]
    return bgr if conversion is None else cv2.cvtColor(bgr, getattr(cv2, conversion))


def decode_frame(header: Any, payload: Any) -> tuple[NetFrameHeader, np.ndarray]:
    """(header, HxWxC uint8 frame). A raw frame is a read-only view of ``payload`` (no copy); a JPEG/PNG frame is
    checked (its image header must declare the frame header's size) before it is decoded."""
    info = NetFrameHeader.unpack(header)
    checked, data = check_frame(header, payload, width=info.width, height=info.height, pixel_format=info.pixel_format)
    return checked, decode_payload(checked, data)


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
