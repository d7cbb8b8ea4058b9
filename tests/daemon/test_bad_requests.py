"""Malformed, oversized, unknown, mistyped and misaddressed requests each get an error reply with a stable code,
while another session keeps streaming through the same daemon."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdlive.daemon.protocol.constants import PROTOCOL_VERSION
from sdlive.daemon.protocol.errors import ERROR_CODES
from sdlive.daemon.protocol.secret import secure_client
from sdlive.obs_bridge.client import DaemonClient, DaemonError, InvalidRequest

SIZE = 64


class RawClient:
    """A DEALER that sends arbitrary frames and returns the daemon's JSON reply."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        secure_client(self.sock)  # local auth is on by default: this session's secret (tests/conftest.py)
        self.sock.connect(address)

    def ask(self, *frames: bytes, timeout_s: float = 10.0) -> dict:
        self.sock.send_multipart(list(frames))
        assert self.sock.poll(int(timeout_s * 1000)), "the daemon did not answer"
        return json.loads(self.sock.recv_multipart()[-1])

    def close(self) -> None:
        self.sock.close(linger=0)


class Streamer(threading.Thread):
    """Keeps one session streaming in the background and counts outputs."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.client = DaemonClient(address, timeout_s=30.0)
        self.session = self.client.open_session(width=SIZE, height=SIZE, fps=15, preset="anime")
        self.outputs = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            i = 0
            while not self._halt.is_set():
                if (self.session.pending_inputs or 0) <= 1:
                    self.session.send(np.full((SIZE, SIZE, 3), i % 256, np.uint8))
                    i += 1
                if self.session.recv(timeout_s=1 / 15) is not None:
                    self.outputs += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.session.close()
        self.client.close()


@pytest.fixture(scope="module")
def streamer(daemon):
    s = Streamer(daemon.control_address)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def raw(daemon):
    client = RawClient(daemon.control_address)
    yield client
    client.close()


def assert_error(reply: dict, code: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    assert reply["error"]["code"] in ERROR_CODES


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xff\xfe not utf-8", "bad_json"),
        (b"{not json", "bad_json"),
        (b"[1, 2, 3]", "bad_request"),
        (b'{"id": 1}', "bad_request"),
        (b'{"op": 42}', "bad_request"),
        (b'{"op": "teleport"}', "unknown_op"),
        (b'{"op": "open_session", "width": "64", "height": 64, "fps": 30}', "bad_request"),
        (b'{"op": "open_session", "width": 64, "height": 64, "fps": 30, "bogus": 1}', "bad_request"),
        (b'{"op": "open_session", "width": 64, "height": 64, "fps": 30, "params": {"steps": 9}}', "bad_params"),
        (b'{"op": "open_session", "width": 70, "height": 64, "fps": 30}', "bad_params"),
        (b'{"op": "open_session", "width": 64, "height": 64, "fps": 30, "preset": "no-such"}', "unknown_preset"),
        (b'{"op": "set_preset", "session_id": "deadbeef", "name": "anime"}', "unknown_session"),
        (b'{"op": "set_params", "session_id": "deadbeef", "steps": 2}', "unknown_session"),
        (b'{"op": "close_session", "session_id": "deadbeef"}', "unknown_session"),
        (b'{"op": "heartbeat", "session_id": "deadbeef"}', "unknown_session"),
        (b'{"op": "status", "session_id": "deadbeef"}', "unknown_session"),
        (b'{"op": "status", "session_id": "../../etc"}', "bad_request"),
    ],
    ids=lambda v: v.decode("utf-8", "replace")[:40] if isinstance(v, bytes) else v,
)
def test_bad_request_gets_error_reply_with_stable_code(raw, streamer, payload, code):
    assert_error(raw.ask(payload), code)
    assert streamer.error is None


@pytest.mark.parametrize(
    "template",
    [
        '{"op": "hello", "id": "%s"}',
        '{"op": "hello", "client": "%s"}',
        '{"op": "list_presets", "token": "%s"}',
        '{"op": "set_preset", "id": 7, "session_id": "SESSION", "name": "%s"}',
        '{"op": "set_params", "session_id": "SESSION", "prompt": "a cat %s"}',
        '{"op": "open_session", "width": 64, "height": 64, "fps": 30, "client": "%s"}',
        '{"op": "status", "%s": 1}',
    ],
)
@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\udc00\\ud800"])
def test_lone_surrogates_get_bad_json_and_the_daemon_lives(daemon, raw, streamer, template, escape):
    """A JSON \\uD800-style escape decodes to text UTF-8 cannot hold; it once killed the IO thread while encoding
    the reply (the id or the prompt echoed back). It is refused at decoding, with the field named."""
    payload = template.replace("SESSION", streamer.session.session_id) % escape
    reply = raw.ask(payload.encode())
    assert_error(reply, "bad_json")
    assert "surrogate" in reply["error"]["message"]
    assert daemon.alive
    assert raw.ask(b'{"op": "hello", "id": "after"}')["id"] == "after"


def test_a_valid_surrogate_pair_is_just_text(raw):
    reply = raw.ask(b'{"op": "hello", "id": "\\ud83d\\ude00"}')
    assert reply["ok"] and reply["id"] == "\U0001f600"


def test_oversized_message_gets_too_large(raw, streamer):
    big = json.dumps({"op": "hello", "client": "x" * (70 * 1024)}).encode()
    assert_error(raw.ask(big), "too_large")


def test_multi_frame_request_gets_bad_request(raw):
    assert_error(raw.ask(b'{"op": "hello"}', b"extra"), "bad_request")


def test_req_style_envelope_is_answered_in_kind(daemon):
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    secure_client(req)  # local auth is on by default: this session's secret (tests/conftest.py)
    req.connect(daemon.control_address)
    try:
        req.send(b'{"op": "hello", "id": "r1"}')
        assert req.poll(10_000)
        reply = json.loads(req.recv())
        assert reply["ok"] and reply["id"] == "r1" and reply["protocol"] == PROTOCOL_VERSION
    finally:
        req.close(linger=0)


def test_error_reply_echoes_request_id(raw):
    reply = raw.ask(b'{"op": "set_preset", "id": "abc", "session_id": "deadbeef", "name": "anime"}')
    assert reply["id"] == "abc"
    assert_error(reply, "unknown_session")


def test_bad_preset_and_params_on_a_live_session(daemon, streamer, raw):
    session_id = streamer.session.session_id
    with daemon.client() as client:
        with pytest.raises(DaemonError) as err:
            client.set_preset(session_id, "no-such-preset")
        assert err.value.code == "unknown_preset"
        for bad in ({"steps": 7}, {"prompt": "   "}):
            # the daemon's answer, and the client's own refusal before sending: the same model, the same code
            assert_error(raw.ask(json.dumps({"op": "set_params", "session_id": session_id, **bad}).encode()), "bad_params")
            with pytest.raises(InvalidRequest) as refused:
                client.set_params(session_id, **bad)
            assert refused.value.code == "bad_params"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
ops = st.sampled_from(["hello", "open_session", "close_session", "set_preset", "set_params", "list_presets",
                       "status", "heartbeat", "nope", ""])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=256))
def test_random_bytes_never_kill_the_daemon(raw, payload):
    reply = raw.ask(payload)
    if not reply["ok"]:
        assert reply["error"]["code"] in ERROR_CODES


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=ops, fields=st.dictionaries(
    st.sampled_from(["width", "height", "fps", "pixel_format", "session_id", "name", "steps", "prompt", "noise_scale",
                     "seed", "transport", "params", "id", "token", "preset", "encoding"]),
    json_values, max_size=5))
def test_random_fields_get_a_reply_never_a_crash(raw, op, fields):
    if op == "open_session":
        fields.pop("width", None)  # never actually open sessions from here: the streamer owns the capacity test
    reply = raw.ask(json.dumps({"op": op, **fields}).encode())
    if not reply["ok"]:
        assert reply["error"]["code"] in ERROR_CODES
    assert "shutdown" not in op


def test_the_other_session_kept_streaming(daemon, streamer):
    before = streamer.outputs
    deadline = time.monotonic() + 20
    while streamer.outputs < before + 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert streamer.error is None
    assert streamer.outputs >= before + 8, "the streaming session stalled while bad requests were answered"
    assert daemon.alive
