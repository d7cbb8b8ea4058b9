"""Control messages: every model round-trips through its wire form, the decoder maps each kind of bad input to
its stable error code (echoing the id when it can), reply builders produce the documented envelope, and the
auth rules hold."""

from __future__ import annotations

import json

import pytest

from sdlive.daemon.protocol.errors import ERROR_CODES, ErrorCode, ProtocolError
from sdlive.daemon.protocol.messages import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    REPLY_MODELS,
    REQUEST_MODELS,
    Capabilities,
    CloseSessionReply,
    CloseSessionRequest,
    DaemonBeat,
    ErrorReply,
    Event,
    HeartbeatReply,
    HeartbeatRequest,
    HelloReply,
    HelloRequest,
    ListPresetsReply,
    ListPresetsRequest,
    NetEndpoints,
    OpenSessionReply,
    OpenSessionRequest,
    ParamsUpdate,
    PresetInfo,
    SessionStats,
    SetParamsReply,
    SetParamsRequest,
    SetPresetReply,
    SetPresetRequest,
    ShutdownReply,
    ShutdownRequest,
    StatusReply,
    StatusRequest,
    authorize,
    check_bind_address,
    decode_pub,
    decode_reply,
    decode_request,
    encode_message,
    encode_pub,
    encode_request,
    error_reply,
    is_loopback_address,
    ok_reply,
    ring_name,
)
from sdlive.daemon.protocol.params import GenerationParams

PARAMS = GenerationParams(prompt="ink wash", steps=2, noise_scale=0.7, seed=42, transition_chunks=4, stream_batch=True)
STATS = SessionStats(
    session_id="s1",
    width=640,
    height=360,
    fps=30.0,
    pixel_format="bgra",
    latency_frames=5,
    params=PARAMS,
    fps_in=30.0,
    fps_out=29.5,
    latency_ms_p50=80.0,
    latency_ms_p95=95.5,
    latency_ms_p99=120.25,
    jitter_ms=2.5,
    frames_in=300,
    frames_out=290,
    dropped_in=3,
    dropped_out=1,
    deadline_misses=2,
    step_ms=11.0,
    stage_ms={"encode": 3.0, "dit": 22.0, "decode": 4.0},
    device_memory_mb=2048.0,
    preset="anime",
    steps=2,
    transport="shm",
    ts=1700000000.5,
)

REQUESTS = [
    HelloRequest(id=1, client="obs-script", protocol=PROTOCOL_VERSION),
    OpenSessionRequest(
        id="open-1",
        token="t0k",
        width=1280,
        height=720,
        fps=30.0,
        pixel_format="rgb24",
        preset="anime",
        params=ParamsUpdate(
            prompt="ink wash", steps=3, noise_scale=0.5, seed=7, transition_chunks=2, stream_batch=False
        ),
        transport="net",
        encoding="jpeg",
        client="sdlive cam",
    ),
    OpenSessionRequest(width=640, height=360, fps=25.0),
    CloseSessionRequest(session_id="abc_123"),
    SetPresetRequest(session_id="abc", name="watercolor"),
    SetParamsRequest(session_id="abc", prompt="neon", steps=1, noise_scale=1.0, seed=0, transition_chunks=0),
    SetParamsRequest(session_id="abc", steps=4),
    ListPresetsRequest(id=9),
    StatusRequest(),
    StatusRequest(session_id="abc"),
    HeartbeatRequest(session_id="abc"),
    HeartbeatRequest(),
    ShutdownRequest(token="secret"),
]

REPLIES = {
    "hello": HelloReply(
        daemon_version="0.1.0",
        model="tiny",
        device="cpu",
        capabilities=Capabilities(max_sessions=4),
        auth_required=True,
    ),
    "open_session": OpenSessionReply(
        session_id="s1",
        transport="shm",
        width=640,
        height=360,
        fps=30.0,
        pixel_format="bgra",
        input_ring=ring_name("s1", "in"),
        output_ring=ring_name("s1", "out"),
        slots=4,
        latency_frames=8,
        preset="anime",
        params=PARAMS,
    ),
    "close_session": CloseSessionReply(session_id="s1"),
    "set_preset": SetPresetReply(session_id="s1", preset="anime", params=PARAMS),
    "set_params": SetParamsReply(session_id="s1", params=PARAMS),
    "list_presets": ListPresetsReply(
        presets=[
            PresetInfo(
                name="anime", prompt="anime style", steps=2, noise_scale=0.7, seed=1, hotkey="F1", source="shipped"
            ),
            PresetInfo(name="ink", prompt="ink", steps=1, noise_scale=0.5, seed=2),
        ]
    ),
    "status": StatusReply(
        daemon_version="0.1.0", model="tiny", device="cpu", uptime_s=12.5, max_sessions=4, sessions=[STATS]
    ),
    "heartbeat": HeartbeatReply(session_id="s1"),
    "shutdown": ShutdownReply(),
}


def test_every_op_of_the_contract_has_a_request_and_a_reply_model():
    ops = {"hello", "open_session", "close_session", "set_preset", "set_params", "list_presets", "status",
           "heartbeat", "shutdown"}  # fmt: skip
    assert set(REQUEST_MODELS) == ops == set(REPLY_MODELS)
    assert {r.op for r in REQUESTS} == ops
    assert set(REPLIES) == ops


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.op)
def test_every_request_round_trips_through_its_wire_form(request_):
    raw = encode_request(request_)
    assert json.loads(raw)["op"] == request_.op
    assert decode_request(raw) == request_
    assert decode_request(raw.decode()) == request_  # str input too


@pytest.mark.parametrize("op", sorted(REPLIES))
def test_every_reply_round_trips_with_its_id_echoed(op):
    raw = ok_reply(REPLIES[op], id="req-7")
    data = json.loads(raw)
    assert data["ok"] is True and data["id"] == "req-7"
    parsed = decode_reply(raw, op)
    assert type(parsed) is REPLY_MODELS[op]
    assert parsed == REPLIES[op].model_copy(update={"id": "req-7"})


def test_an_open_session_reply_for_the_network_transport_carries_endpoints():
    reply = OpenSessionReply(
        session_id="n1", transport="net", width=1280, height=720, fps=30.0, pixel_format="bgr24",
        net=NetEndpoints(input_address="tcp://10.0.0.2:6001", output_address="tcp://10.0.0.2:6002", encoding="jpeg"),
        latency_frames=8,
    )  # fmt: skip
    parsed = decode_reply(ok_reply(reply), "open_session")
    assert parsed.net.encoding == "jpeg" and parsed.input_ring is None
    assert parsed == reply


def test_replies_tolerate_fields_a_newer_daemon_adds():
    raw = json.dumps({"ok": True, "id": None, "session_id": "s1", "closed": True, "future_field": [1, 2]})
    assert decode_reply(raw, "close_session") == CloseSessionReply(session_id="s1")


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_error_code_round_trips_as_an_error_reply(code):
    raw = error_reply(code, "what went wrong and the fix", id=5)
    assert json.loads(raw) == {"ok": False, "id": 5, "error": {"code": code, "message": "what went wrong and the fix"}}
    parsed = decode_reply(raw, "hello")
    assert isinstance(parsed, ErrorReply)
    assert parsed.error.error_code is ErrorCode(code) and parsed.id == 5


def test_an_unknown_error_code_from_a_newer_daemon_parses_but_has_no_enum():
    parsed = decode_reply(b'{"ok":false,"id":null,"error":{"code":"brand_new","message":"m"}}')
    assert parsed.error.code == "brand_new" and parsed.error.error_code is None


def test_error_reply_refuses_a_code_outside_the_contract():
    with pytest.raises(ValueError):
        error_reply("oops", "not a code")


def test_the_stable_error_codes_are_exactly_the_contract():
    assert ERROR_CODES == {"bad_json", "bad_request", "unknown_op", "too_large", "unauthorized", "unknown_session",
                           "unknown_preset", "bad_params", "capacity", "internal", "loading"}  # fmt: skip


def test_protocol_error_becomes_the_documented_reply():
    err = ProtocolError("unknown_session", "no session 'x'", id=3)
    assert err.code is ErrorCode.UNKNOWN_SESSION
    assert err.to_dict() == {"ok": False, "id": 3, "error": {"code": "unknown_session", "message": "no session 'x'"}}
    assert str(err) == "unknown_session: no session 'x'"


@pytest.mark.parametrize(
    ("raw", "code", "fragment"),
    [
        (b"\xff\xfe", ErrorCode.BAD_JSON, "not UTF-8"),
        (b"{op: hello}", ErrorCode.BAD_JSON, "not JSON"),
        (b"", ErrorCode.BAD_JSON, "not JSON"),
        (b'{"op": "hello", "x": NaN}', ErrorCode.BAD_JSON, "NaN"),
        (b"[" * 50000 + b"]" * 50000, ErrorCode.TOO_LARGE, "limit is 65536"),
        (b"[" * 30000, ErrorCode.BAD_JSON, "nested too deeply"),
        (b'"hello"', ErrorCode.BAD_REQUEST, "JSON object"),
        (b"[1, 2]", ErrorCode.BAD_REQUEST, "JSON object"),
        (b"null", ErrorCode.BAD_REQUEST, "JSON object"),
        (b"{}", ErrorCode.BAD_REQUEST, 'no "op"'),
        (b'{"op": 5}', ErrorCode.BAD_REQUEST, '"op" must be a string'),
        (b'{"op": "launch_rockets"}', ErrorCode.UNKNOWN_OP, "known ops are hello"),
        (b'{"op": "hello", "colour": "red"}', ErrorCode.BAD_REQUEST, "unknown field 'colour'"),
        (b'{"op": "open_session", "width": "640", "height": 360, "fps": 30}', ErrorCode.BAD_REQUEST, "width"),
        (b'{"op": "open_session", "width": 640, "height": 360}', ErrorCode.BAD_REQUEST, "fps: required"),
        (b'{"op": "open_session", "width": 8, "height": 360, "fps": 30}', ErrorCode.BAD_REQUEST, "greater than"),
        (b'{"op": "open_session", "width": 640, "height": 360, "fps": 30, "pixel_format": "yuv"}',
         ErrorCode.BAD_REQUEST, "pixel_format"),
        (b'{"op": "open_session", "width": 640, "height": 360, "fps": 30, "transport": "carrier-pigeon"}',
         ErrorCode.BAD_REQUEST, "transport"),
        (b'{"op": "open_session", "width": 640, "height": 360, "fps": 30, "params": {"steps": 0}}',
         ErrorCode.BAD_PARAMS, "params.steps"),
        (b'{"op": "set_params", "session_id": "s", "steps": 5}', ErrorCode.BAD_PARAMS, "steps"),
        (b'{"op": "set_params", "session_id": "s", "noise_scale": 0}', ErrorCode.BAD_PARAMS, "noise_scale"),
        (b'{"op": "set_params", "session_id": "s", "seed": -1}', ErrorCode.BAD_PARAMS, "seed"),
        (b'{"op": "set_params", "session_id": "s", "prompt": "   "}', ErrorCode.BAD_PARAMS, "blank"),
        (b'{"op": "set_params", "steps": 2}', ErrorCode.BAD_REQUEST, "session_id: required"),
        (b'{"op": "close_session", "session_id": "../../etc"}', ErrorCode.BAD_REQUEST, "session_id"),
        (b'{"op": "hello", "id": true}', ErrorCode.BAD_REQUEST, "id"),
        (b'{"op": "hello", "id": [1]}', ErrorCode.BAD_REQUEST, "id"),
        (b'{"op": "status", "session_id": 3}', ErrorCode.BAD_REQUEST, "session_id"),
        (b'{"op": "set_preset", "session_id": "s", "name": ""}', ErrorCode.BAD_REQUEST, "name"),
    ],
)  # fmt: skip
def test_bad_input_maps_to_its_error_code(raw, code, fragment):
    with pytest.raises(ProtocolError) as info:
        decode_request(raw)
    assert info.value.code is code
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (b'{"op": "hello", "id": "\\ud800"}', "id holds"),
        (b'{"op": "hello", "client": "ok \\udfff"}', "client holds"),
        (b'{"op": "open_session", "width": 64, "height": 64, "fps": 30, "params": {"prompt": "\\udc00\\ud83d"}}',
         "params.prompt holds"),
        (b'{"op": "hello", "\\ud800": 1}', "a key of the message"),
        (b'{"op": "hello", "x": [1, ["\\ud800"]]}', "x[1][0] holds"),
        ('{"op": "hello", "id": "\ud800"}', "id holds"),  # a str that already holds one
    ],
)  # fmt: skip
def test_lone_surrogates_are_bad_json_naming_the_field(raw, where):
    with pytest.raises(ProtocolError) as info:
        decode_request(raw)
    assert info.value.code is ErrorCode.BAD_JSON
    assert where in info.value.message and "surrogate" in info.value.message


def test_replies_encode_any_text_as_valid_json():
    """Replies never raise on text: one that UTF-8 cannot hold goes out as JSON escapes (the same JSON value)."""
    payload = error_reply("bad_request", "bad \ud800", id="\udfff")
    assert payload.isascii() and json.loads(payload) == {"ok": False, "id": "\udfff",
                                                          "error": {"code": "bad_request", "message": "bad \ud800"}}
    payload = ok_reply(HeartbeatReply(session_id="\ud800"))
    assert payload.isascii() and json.loads(payload)["session_id"] == "\ud800"
    assert ok_reply(HeartbeatReply(session_id="Grüße 😀")).decode("utf-8").count("😀") == 1  # UTF-8 as usual


def test_a_message_exactly_at_the_limit_is_decoded_and_one_byte_more_is_too_large():
    raw = b'{"op":"hello"' + b" " * (MAX_MESSAGE_BYTES - len(b'{"op":"hello"}')) + b"}"  # whitespace: valid JSON
    assert len(raw) == MAX_MESSAGE_BYTES
    assert decode_request(raw) == HelloRequest()
    with pytest.raises(ProtocolError) as info:
        decode_request(raw + b" ")
    assert info.value.code is ErrorCode.TOO_LARGE


def test_errors_echo_the_request_id_when_it_is_readable():
    with pytest.raises(ProtocolError) as info:
        decode_request(b'{"op": "set_params", "id": "abc", "session_id": "s", "steps": 9}')
    assert info.value.id == "abc"
    assert json.loads(error_reply(info.value.code, info.value.message, id=info.value.id))["id"] == "abc"
    with pytest.raises(ProtocolError) as info:
        decode_request(b'{"op": "nope", "id": 77}')
    assert info.value.id == 77


def test_types_are_strict_on_the_wire():
    with pytest.raises(ProtocolError, match="steps"):
        decode_request(b'{"op": "set_params", "session_id": "s", "steps": 2.0}')
    with pytest.raises(ProtocolError, match="steps"):
        decode_request(b'{"op": "set_params", "session_id": "s", "steps": true}')
    # an integer is a valid JSON number for a float field
    assert decode_request(b'{"op": "open_session", "width": 64, "height": 64, "fps": 30}').fps == 30.0


def test_set_params_changes_lists_only_what_the_request_sets():
    request = decode_request(b'{"op": "set_params", "session_id": "s", "prompt": "neon", "seed": 3}')
    assert request.changes() == {"prompt": "neon", "seed": 3}
    assert OpenSessionRequest(width=64, height=64, fps=30, params=ParamsUpdate(steps=2)).params.changes() == {
        "steps": 2
    }


def test_encode_request_omits_absent_fields_and_refuses_oversized_requests():
    assert encode_request(StatusRequest()) == b'{"op":"status"}'
    with pytest.raises(ValueError, match="limit is 65536"):
        encode_request(HelloRequest(client="x" * 100, id="y" * 100).model_copy(update={"client": "x" * 70000}))


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        ("stats", STATS),
        ("event", Event(event="preset_changed", session_id="s1", preset="anime", ts=1.0)),
        ("event", Event(event="error", code="internal", message="VAE failed", ts=2.0)),
        ("daemon", DaemonBeat(pid=1234, uptime_s=3.5, sessions=1, ts=3.0)),
        ("daemon", DaemonBeat(state="dead", pid=1234, uptime_s=9.0, message="CUDA error", ts=4.0)),
    ],
)
def test_pub_messages_round_trip_as_topic_and_json(topic, message):
    frames = encode_pub(topic, message)
    assert frames[0] == topic.encode()
    assert decode_pub(frames) == (topic, message)


def test_session_stats_carry_every_documented_field():
    fields = set(json.loads(encode_message(STATS)))
    assert {"session_id", "fps_in", "fps_out", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "jitter_ms",
            "frames_in", "frames_out", "dropped_in", "dropped_out", "deadline_misses", "step_ms", "stage_ms",
            "device_memory_mb", "preset", "steps", "transport"} <= fields  # fmt: skip


def test_decode_pub_rejects_unknown_topics_and_bad_shapes():
    with pytest.raises(ProtocolError) as info:
        decode_pub([b"gossip", b"{}"])
    assert info.value.code is ErrorCode.UNKNOWN_OP
    with pytest.raises(ProtocolError) as info:
        decode_pub([b"stats"])
    assert info.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(ProtocolError) as info:
        decode_pub([b"stats", b'{"fps_in": 3}'])
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_decode_reply_rejects_a_reply_without_ok():
    with pytest.raises(ProtocolError) as info:
        decode_reply(b'{"id": 1}')
    assert info.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(ProtocolError) as info:
        decode_reply(b"garbage")
    assert info.value.code is ErrorCode.BAD_JSON


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("tcp://127.0.0.1:5557", True),
        ("tcp://127.0.0.2:5557", True),
        ("tcp://localhost:5557", True),
        ("tcp://[::1]:5557", True),
        ("ipc:///tmp/sdlive.sock", True),
        ("inproc://control", True),
        ("tcp://0.0.0.0:5557", False),
        ("tcp://*:5557", False),
        ("tcp://192.168.1.20:5557", False),
        ("tcp://eth0:5557", False),
        ("tcp://[::]:5557", False),
        ("tcp://studio-pc.local:5557", False),
        ("tcp://192.168.1.20;127.0.0.1:5557", True),
    ],
)
def test_loopback_detection(address, loopback):
    assert is_loopback_address(address) is loopback


def test_binding_a_non_loopback_address_requires_a_token():
    check_bind_address("tcp://127.0.0.1:5557", None)
    check_bind_address("tcp://0.0.0.0:5557", "s3cret")
    with pytest.raises(ValueError, match="requires an auth token: pass --token"):
        check_bind_address("tcp://0.0.0.0:5557", None)
    with pytest.raises(ValueError, match="requires an auth token"):
        check_bind_address("tcp://*:5557", "")


def test_authorize_checks_the_token_on_every_op_but_hello():
    authorize(HelloRequest(), "s3cret")
    authorize(StatusRequest(token="s3cret"), "s3cret")
    authorize(StatusRequest(), None)
    for bad in (StatusRequest(id=4), StatusRequest(token="wrong", id=4)):
        with pytest.raises(ProtocolError) as info:
            authorize(bad, "s3cret")
        assert info.value.code is ErrorCode.UNAUTHORIZED and info.value.id == 4


def test_ring_names_follow_the_session():
    assert ring_name("abc", "in") == "sdlive-abc-in"
    assert ring_name("abc", "out") == "sdlive-abc-out"
    with pytest.raises(ValueError):
        ring_name("abc", "sideways")
