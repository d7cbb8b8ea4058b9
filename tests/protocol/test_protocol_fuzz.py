"""Property tests: whatever bytes arrive, ``decode_request`` returns a valid request or raises ``ProtocolError``
with a stable code, never any other exception (the daemon must never die from a message). Also: anything it
accepts re-encodes to an equal request, and the ring header validator and netframe decoder only raise their own
errors on garbage."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdlive.daemon.protocol.errors import ERROR_CODES, ErrorCode, ProtocolError
from sdlive.daemon.protocol.messages import (
    MAX_MESSAGE_BYTES,
    REQUEST_MODELS,
    OpenSessionRequest,
    ParamsUpdate,
    SetParamsRequest,
    decode_request,
    encode_request,
)
from sdlive.daemon.protocol.netframe import NETFRAME_HEADER_SIZE, NetFrameError, decode_frame
from sdlive.daemon.protocol.ring import HEADER_SIZE, FrameRing, RingError, ring_path
from sdlive.daemon.protocol.secret import secure_client

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DECODER_CODES = {"bad_json", "bad_request", "unknown_op", "too_large", "bad_params"}

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["id", "token", "session_id", "name", "width", "height", "fps", "pixel_format", "preset", "params",
     "transport", "encoding", "client", "prompt", "steps", "noise_scale", "seed", "transition_chunks",
     "protocol", "stream_batch", "bogus"]
)  # fmt: skip


def decode_or_error(raw) -> object:
    try:
        request = decode_request(raw)
    except ProtocolError as exc:
        assert exc.code.value in DECODER_CODES, exc.code
        assert exc.message, "every error names the problem"
        return exc
    assert request.op in REQUEST_MODELS
    return request


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_give_a_request_or_a_protocol_error(raw):
    decode_or_error(raw)


@FUZZ
@given(json_values)
def test_any_json_value_gives_a_request_or_a_protocol_error(value):
    result = decode_or_error(json.dumps(value).encode())
    if not isinstance(value, dict):
        assert isinstance(result, ProtocolError) and result.code is ErrorCode.BAD_REQUEST


@settings(FUZZ, max_examples=200)
@given(st.sampled_from(sorted(REQUEST_MODELS)), st.dictionaries(field_names, json_values, max_size=8))
def test_known_ops_with_random_fields_give_a_request_or_a_protocol_error(op, fields):
    result = decode_or_error(json.dumps({**fields, "op": op}).encode())
    if not isinstance(result, ProtocolError):
        # whatever was accepted re-encodes to the same request
        assert decode_request(encode_request(result)) == result


@FUZZ
@given(st.text(min_size=1, max_size=30).filter(lambda op: op not in REQUEST_MODELS), st.integers())
def test_unknown_ops_are_named_unknown_op_and_echo_the_id(op, msg_id):
    result = decode_or_error(json.dumps({"op": op, "id": msg_id}).encode())
    assert isinstance(result, ProtocolError) and result.code is ErrorCode.UNKNOWN_OP
    assert result.id == (msg_id if -(2**63) <= msg_id < 2**63 else None)


@FUZZ
@given(st.integers(min_value=1, max_value=4096))
def test_anything_over_the_limit_is_too_large(extra):
    raw = b'{"op":"hello","client":"' + b"x" * (MAX_MESSAGE_BYTES + extra) + b'"}'
    result = decode_or_error(raw)
    assert isinstance(result, ProtocolError) and result.code is ErrorCode.TOO_LARGE


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=200))
def test_truncated_or_spliced_valid_messages_never_escape(noise, cut):
    valid = encode_request(OpenSessionRequest(width=640, height=360, fps=30.0, params=ParamsUpdate(steps=2)))
    decode_or_error(valid[:cut] + noise)
    decode_or_error(noise + valid[cut:])


params_updates = st.builds(
    SetParamsRequest,
    session_id=st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z"),
    prompt=st.none() | st.text(min_size=1, max_size=200).filter(str.strip),
    steps=st.none() | st.integers(1, 4),
    noise_scale=st.none() | st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    seed=st.none() | st.integers(0, 2**63 - 1),
    transition_chunks=st.none() | st.integers(0, 64),
    id=st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=128),
)


open_sessions = st.builds(
    OpenSessionRequest,
    width=st.integers(16, 7680),
    height=st.integers(16, 4320),
    fps=st.floats(min_value=0.0, max_value=240.0, exclude_min=True),
    pixel_format=st.sampled_from(["bgra", "rgba", "rgb24", "bgr24"]),
    preset=st.none() | st.text(min_size=1, max_size=64),
    params=st.none()
    | st.builds(ParamsUpdate, steps=st.none() | st.integers(1, 4), seed=st.none() | st.integers(0, 2**63 - 1)),
    transport=st.sampled_from(["shm", "net"]),
    encoding=st.sampled_from(["raw", "jpeg"]),
    client=st.none() | st.text(max_size=128),
    token=st.none() | st.text(max_size=256),
)


@FUZZ
@given(open_sessions)
def test_every_valid_open_session_round_trips(request):
    assert decode_request(encode_request(request)) == request


@FUZZ
@given(params_updates)
def test_every_valid_set_params_round_trips(request):
    assert decode_request(encode_request(request)) == request


def test_error_codes_used_by_the_decoder_are_part_of_the_contract():
    assert DECODER_CODES <= ERROR_CODES


@pytest.fixture(scope="module")
def scratch_ring():
    name = f"sdlive-fuzz-{uuid.uuid4().hex[:10]}"
    ring = FrameRing.create(name, width=8, height=8, pixel_format="bgra", slots=2)
    yield name, ring
    ring.unlink()
    ring.close()


@pytest.mark.skipif(os.name == "nt", reason="rewrites the backing file")
@FUZZ
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_a_garbage_ring_header_raises_ring_error_only(scratch_ring, garbage):
    name, ring = scratch_ring
    pristine = bytes(ring._buf[:HEADER_SIZE])
    try:
        with open(ring_path(name), "r+b") as fh:
            fh.write(garbage)
        try:
            FrameRing.open(name).close()
        except RingError as exc:
            assert str(exc)
    finally:
        ring._buf[:HEADER_SIZE] = pristine


@FUZZ
@given(st.binary(min_size=NETFRAME_HEADER_SIZE, max_size=NETFRAME_HEADER_SIZE), st.binary(max_size=256))
def test_garbage_network_frames_raise_net_frame_error_only(header, payload):
    try:
        decode_frame(b"SDLF" + header[4:] if header[:1] == b"S" else header, payload)
    except NetFrameError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST


# ------------------------------------------------------------------- all of Unicode and extreme numbers

any_text = st.text(st.characters(exclude_categories=()), max_size=24) | st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()), min_size=1, max_size=3
).map(lambda s: "x" + s)  # lone surrogates: JSON \ud800-style escapes once killed the daemon
extreme_numbers = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e308, -1e308, 5e-324, -0.0, 2**63, -(2**63) - 1, 2**64, 10**400])
    | st.integers()
)
wild_values = st.recursive(
    st.none() | st.booleans() | extreme_numbers | any_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(any_text, children, max_size=3),
    max_leaves=8,
)


def wire(obj: object) -> bytes:
    """JSON as an attacker sends it: NaN/Infinity allowed, lone surrogates as \\uXXXX escapes (ASCII output)."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=True).encode("ascii")


@settings(FUZZ, max_examples=300)
@given(st.sampled_from(sorted(REQUEST_MODELS)), st.dictionaries(field_names, wild_values, max_size=6))
def test_every_field_with_any_unicode_or_extreme_number_gives_a_request_or_a_protocol_error(op, fields):
    result = decode_or_error(wire({**fields, "op": op}))
    if not isinstance(result, ProtocolError):
        assert decode_request(encode_request(result)) == result  # accepted: it re-encodes (UTF-8) to itself


@pytest.fixture(scope="module")
def daemon_socket(daemon):
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock)  # local auth is on by default: this session's secret (tests/conftest.py)
    sock.connect(daemon.control_address)
    yield sock
    sock.close(0)


def ask_daemon(sock, raw: bytes) -> dict:
    sock.send(raw)
    assert sock.poll(30_000), "the daemon did not answer"
    reply = json.loads(sock.recv_multipart()[-1])
    assert isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert reply["error"]["code"] in ERROR_CODES and reply["error"]["message"]
    return reply


@settings(FUZZ, max_examples=120)
@given(
    st.sampled_from(sorted(set(REQUEST_MODELS) - {"shutdown", "open_session"})),
    st.dictionaries(field_names, wild_values, max_size=5),
)
def test_a_real_daemon_answers_any_unicode_and_extreme_numbers_in_every_field(daemon, daemon_socket, op, fields):
    """The same, over real ZeroMQ: each message gets a reply that is valid JSON with a stable code, and the daemon
    lives (shutdown and open_session are left out: one stops the shared daemon, the other would hold capacity)."""
    ask_daemon(daemon_socket, wire({**fields, "op": op}))
    assert daemon.alive


@settings(FUZZ, max_examples=80)
@given(st.binary(max_size=512) | wild_values.map(wire))
def test_a_real_daemon_answers_any_raw_bytes(daemon, daemon_socket, raw):
    ask_daemon(daemon_socket, raw)
    assert daemon.alive
