"""Network frames: the 40-byte header round-trips, raw frames are exact and zero-copy, JPEG frames come back close
in every pixel format, malformed messages raise NetFrameError (a ProtocolError), and a real ZeroMQ pair carries
them."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
import zmq

from sdlive.daemon.protocol.constants import PIXEL_FORMATS
from sdlive.daemon.protocol.errors import ErrorCode, ProtocolError
from sdlive.daemon.protocol.netframe import (
    NETFRAME_HEADER_SIZE,
    NetFrameError,
    NetFrameHeader,
    check_frame,
    compressed_size,
    decode_frame,
    encode_frame,
    recv_frame,
    send_frame,
)

FORMATS = sorted(PIXEL_FORMATS)


def gradient(height: int, width: int, channels: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    planes = [(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), ((x + y) * 127 // (width + height))]
    planes += [np.full_like(x, 255)] * (channels - 3)
    return np.stack(planes[:channels], axis=-1).astype(np.uint8)


def test_header_is_40_bytes_and_round_trips():
    header = NetFrameHeader(seq=7, timestamp_ns=123456789012, width=1280, height=720, pixel_format="bgra",
                            encoding="raw", size=1280 * 720 * 4)  # fmt: skip
    packed = header.pack()
    assert len(packed) == NETFRAME_HEADER_SIZE == 40
    assert packed[:4] == b"SDLF"
    assert struct.unpack_from("<Q", packed, 8)[0] == 7
    assert NetFrameHeader.unpack(packed) == header


@pytest.mark.parametrize("pixel_format", FORMATS)
def test_raw_frames_round_trip_exactly_without_a_copy(pixel_format):
    pixels = gradient(36, 64, PIXEL_FORMATS[pixel_format].bytes_per_pixel)
    head, payload = encode_frame(pixels, seq=3, timestamp_ns=99, pixel_format=pixel_format)
    assert isinstance(payload, memoryview) and payload.obj is pixels  # a view of the caller's array
    info, out = decode_frame(head, payload)
    assert (info.seq, info.timestamp_ns, info.width, info.height) == (3, 99, 64, 36)
    assert info.encoding == "raw" and info.pixel_format == pixel_format
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("pixel_format", FORMATS)
def test_jpeg_frames_come_back_close_in_the_same_pixel_format(pixel_format):
    channels = PIXEL_FORMATS[pixel_format].bytes_per_pixel
    pixels = gradient(72, 128, channels)
    head, payload = encode_frame(pixels, seq=1, timestamp_ns=5, pixel_format=pixel_format, encoding="jpeg")
    assert len(payload) < pixels.nbytes / 4, "a smooth gradient must compress well"
    info, out = decode_frame(head, payload)
    assert info.encoding == "jpeg" and out.shape == pixels.shape and out.dtype == np.uint8
    error = np.abs(out[..., :3].astype(int) - pixels[..., :3].astype(int)).mean()
    assert error < 3.0, f"mean abs error {error:.2f}: channels swapped or badly encoded"
    if channels == 4:
        assert (out[..., 3] == 255).all()


def test_a_red_rgb_frame_stays_red_through_jpeg():
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    _, out = decode_frame(*encode_frame(red, seq=1, timestamp_ns=1, pixel_format="rgb24", encoding="jpeg"))
    assert out[..., 0].mean() > 240 and out[..., 2].mean() < 15


@pytest.mark.parametrize(
    ("pixels", "pixel_format", "message"),
    [
        (np.zeros((4, 4, 3), np.float32), "rgb24", "dtype: float32 != uint8"),
        (np.zeros((4, 4, 3), np.uint8), "bgra", "HxWx4"),
        (np.zeros((4, 4), np.uint8), "bgr24", "shape"),
        (np.zeros((4, 4, 3), np.uint8), "yuv", "unknown pixel format"),
    ],
)
def test_encode_rejects_bad_frames_naming_the_problem(pixels, pixel_format, message):
    with pytest.raises(ValueError, match=message):
        encode_frame(pixels, seq=1, timestamp_ns=1, pixel_format=pixel_format)


def test_encode_rejects_an_unknown_encoding():
    with pytest.raises(ValueError, match="unknown encoding 'webp'"):
        encode_frame(np.zeros((4, 4, 3), np.uint8), seq=1, timestamp_ns=1, pixel_format="rgb24", encoding="webp")


def test_non_contiguous_frames_are_sent_as_their_contiguous_copy():
    pixels = gradient(8, 8, 4)[:, ::-1]
    _, out = decode_frame(*encode_frame(pixels, seq=1, timestamp_ns=1, pixel_format="bgra"))
    np.testing.assert_array_equal(out, pixels)


def _good_header(**changes) -> bytearray:
    fields = dict(seq=1, timestamp_ns=2, width=4, height=4, pixel_format="rgb24", encoding="raw", size=48)
    fields.update(changes)
    return bytearray(NetFrameHeader(**fields).pack())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h: h.__setitem__(slice(0, 4), b"XXXX"), "bad frame magic"),
        (lambda h: h.__setitem__(4, 9), "version 9"),
        (lambda h: h.__setitem__(5, 77), "pixel format code 77"),
        (lambda h: h.__setitem__(6, 5), "encoding code 5"),
        (lambda h: struct.pack_into("<I", h, 24, 0), "outside 1..16384"),
        (lambda h: struct.pack_into("<Q", h, 32, 47), "says 47 bytes"),
    ],
)
def test_malformed_headers_raise_net_frame_error(mutate, message):
    header = _good_header()
    mutate(header)
    with pytest.raises(NetFrameError, match=message) as info:
        decode_frame(header, bytes(48))
    assert isinstance(info.value, ProtocolError) and info.value.code is ErrorCode.BAD_REQUEST


def test_a_short_header_or_a_wrong_payload_size_is_refused():
    with pytest.raises(NetFrameError, match="header is 10 bytes"):
        decode_frame(b"0123456789", b"")
    with pytest.raises(NetFrameError, match="payload is 47 bytes"):
        decode_frame(_good_header(), bytes(47))


def test_a_payload_that_is_not_a_jpeg_is_refused_before_decoding():
    header = _good_header(encoding="jpeg", size=20)
    with pytest.raises(NetFrameError, match="does not start with a JPEG SOI marker"):
        decode_frame(header, bytes(20))


def _jpeg(width: int, height: int, **params: int) -> bytes:
    import cv2

    options = [x for name, value in params.items() for x in (int(getattr(cv2, name)), value)]
    ok, data = cv2.imencode(".jpg", np.full((height, width, 3), 90, np.uint8), options)
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("params", [{}, {"IMWRITE_JPEG_PROGRESSIVE": 1}], ids=["baseline", "progressive"])
def test_jpeg_and_png_sizes_are_read_from_their_own_headers(params):
    import cv2

    assert compressed_size(_jpeg(37, 21, **params), "jpeg") == (37, 21)
    ok, png = cv2.imencode(".png", np.zeros((9, 13, 3), np.uint8))
    assert ok and compressed_size(png.tobytes(), "png") == (13, 9)


def _lying_jpeg(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is patched to declare ``width`` x ``height``."""
    data = bytearray(_jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def test_a_tiny_jpeg_declaring_a_huge_image_is_refused_without_decoding_it():
    payload = _lying_jpeg(30000, 30000)
    header = NetFrameHeader(1, 0, 64, 64, "bgr24", "jpeg", len(payload)).pack()
    started = time.perf_counter()
    with pytest.raises(NetFrameError, match="jpeg image is 30000x30000, its frame header says 64x64"):
        check_frame(header, payload, width=64, height=64, pixel_format="bgr24")
    assert time.perf_counter() - started < 0.01, "refusing must cost header bytes, not a decode"


def test_a_frame_that_is_not_the_sessions_size_is_refused_before_its_payload_is_read():
    payload = _jpeg(64, 64)
    header = NetFrameHeader(1, 0, 64, 64, "bgr24", "jpeg", len(payload)).pack()
    with pytest.raises(NetFrameError, match="frame is 64x64 bgr24, the session is 32x32 bgr24"):
        check_frame(header, payload, width=32, height=32, pixel_format="bgr24")


def test_a_png_inside_a_jpeg_frame_is_refused():
    import cv2

    ok, png = cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))
    header = NetFrameHeader(1, 0, 64, 64, "bgr24", "jpeg", len(png)).pack()
    with pytest.raises(NetFrameError, match="does not start with a JPEG SOI"):
        check_frame(header, png.tobytes(), width=64, height=64, pixel_format="bgr24")


def test_a_jpeg_with_a_frame_header_but_no_image_data_is_refused():
    head = _jpeg(16, 16)
    payload = head[: head.index(b"\xff\xda")] + b"\xff\xd9"  # every header segment, then EOI: no scan
    header = NetFrameHeader(1, 0, 16, 16, "bgr24", "jpeg", len(payload)).pack()
    with pytest.raises(NetFrameError, match="could not be decoded"):
        decode_frame(header, payload)


def test_png_frames_round_trip_losslessly():
    pixels = np.random.default_rng(1).integers(0, 256, (24, 40, 4), np.uint8)
    pixels[..., 3] = 255
    head, payload = encode_frame(pixels, seq=3, timestamp_ns=9, pixel_format="rgba", encoding="png")
    info, back = decode_frame(head, payload)
    assert info.encoding == "png" and np.array_equal(back, pixels)


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_frames_cross_a_real_zeromq_push_pull_pair(encoding):
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        for sock in (pull, push):
            sock.setsockopt(zmq.LINGER, 0)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        pixels = gradient(360, 640, 4)
        tracker = send_frame(push, pixels, seq=42, timestamp_ns=777, pixel_format="bgra", encoding=encoding, track=True)
        assert pull.poll(5000), "no frame arrived"
        info, out = recv_frame(pull)
        assert (info.seq, info.timestamp_ns, info.encoding) == (42, 777, encoding)
        if encoding == "raw":
            np.testing.assert_array_equal(out, pixels)
            tracker.wait(5)  # zero-copy send: the buffer is released once zmq is done with it
            assert tracker.done
        else:
            assert np.abs(out.astype(int) - pixels.astype(int)).mean() < 3.0
    finally:
        push.close()
        pull.close()


def test_recv_refuses_a_message_with_the_wrong_number_of_parts():
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send_multipart([b"only-one-part"])
        assert pull.poll(5000)
        with pytest.raises(NetFrameError, match="2 parts"):
            recv_frame(pull)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
