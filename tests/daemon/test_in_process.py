"""The daemon's compute loop and IO thread in this process, with a stand-in engine, for the paths a subprocess with
the real model cannot reach on demand: a prompt that fails to encode, and a compute loop stuck in a long model step
while control requests keep coming. Real ZeroMQ sockets and real shared memory; only the engine is a stand-in
(it implements ``sdlive.daemon.engine.interface.Engine``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import zmq

from sdlive.daemon.config import DaemonConfig
from sdlive.daemon.engine.interface import OutputFrame, StageTimes
from sdlive.daemon.model.configs import CachePolicy
from sdlive.daemon.presets import load_presets
from sdlive.daemon.protocol.messages import (
    ErrorReply,
    Event,
    HeartbeatRequest,
    HelloRequest,
    OpenSessionRequest,
    SetParamsRequest,
    SetPresetRequest,
    StatusRequest,
    decode_pub,
    decode_reply,
    encode_request,
)
from sdlive.daemon.protocol.params import GenerationParams
from sdlive.daemon.protocol.ring import FrameRing
from sdlive.daemon.protocol.secret import secure_client
from sdlive.daemon.server.items import Shutdown
from sdlive.daemon.server.loop import ComputeLoop

UNENCODABLE = "a prompt the text encoder rejects"
WAIT_S = 10.0


@dataclass
class StandInSession:
    """Outputs each frame inverted, at once; ``gate`` (when set) holds ``push`` like a long model step."""

    params: GenerationParams
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)
    latency_frames: int = 0
    frames_in: int = 0
    frames_out: int = 0
    stage_ms: StageTimes = field(default_factory=StageTimes)

    def push(self, frame: np.ndarray) -> list[OutputFrame]:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT_S), "the test never released the model step"
        self.frames_in += 1
        self.frames_out += 1
        return [OutputFrame(self.frames_in - 1, 255 - frame)]

    def flush(self) -> list[OutputFrame]:
        return []

    def set_params(self, **changes: object) -> None:
        self.params = GenerationParams.model_validate({**self.params.model_dump(), **changes})


class StandInEngine:
    model_name = "stand-in"
    device = "cpu"
    compat = "clean"
    cache_policy = CachePolicy(num_kv_cache=8, num_sink=2, sink_threshold=-1.0, rope_refresh_frames=0)

    def __init__(self) -> None:
        self.sessions: list[StandInSession] = []
        self.encoded: list[str] = []

    def open_session(self, *, width: int, height: int, params: GenerationParams | None = None,
                     pixel_format: str = "rgb24") -> StandInSession:  # fmt: skip
        session = StandInSession(params or GenerationParams())
        self.sessions.append(session)
        return session

    def encode_prompt(self, prompt: str) -> None:
        if prompt == UNENCODABLE:
            raise RuntimeError("the text encoder rejected it")
        self.encoded.append(prompt)


@dataclass
class Harness:
    loop: ComputeLoop
    engine: StandInEngine
    control: zmq.Socket
    sub: zmq.Socket

    def request(self, message) -> object:
        self.control.send(encode_request(message))
        assert self.control.poll(WAIT_S * 1000), f"no reply to {message.op}"
        return decode_reply(self.control.recv(), message.op)

    def next_event(self, predicate) -> Event:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.sub.poll(100):
                topic, message = decode_pub(self.sub.recv_multipart())
                if isinstance(message, Event) and predicate(message):
                    return message
        raise AssertionError("the expected event was not published")

    def wait_status(self, session_id: str, predicate) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            entry = self.request(StatusRequest(session_id=session_id)).sessions[0]
            if predicate(entry):
                return
            time.sleep(0.02)
        raise AssertionError(f"status never matched; last: {entry}")


@pytest.fixture
def harness(tmp_path) -> Iterator[Harness]:
    config = DaemonConfig(
        control=f"ipc://{tmp_path}/control", pub=f"ipc://{tmp_path}/pub", ui=False, warmup=False, user_presets=False
    )
    loop = ComputeLoop(config, load_presets(user=False))
    loop.start()
    engine = StandInEngine()
    loop.attach_engine(engine)  # type: ignore[arg-type]
    thread = threading.Thread(target=loop.run, name="compute-loop", daemon=True)
    thread.start()
    ctx = zmq.Context()
    control = ctx.socket(zmq.DEALER)
    secure_client(control)  # local auth is on by default: this session's secret (tests/conftest.py)
    control.connect(config.control)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    secure_client(sub)  # local auth is on by default: this session's secret (tests/conftest.py)
    sub.connect(config.pub)
    harness = Harness(loop, engine, control, sub)
    try:
        yield harness
    finally:
        for s in engine.sessions:
            if s.gate is not None:
                s.gate.set()
        loop.inbox.put(Shutdown("test over"))
        thread.join(WAIT_S)
        control.close(0)
        sub.close(0)
        ctx.term()
    assert not thread.is_alive()


def open_session(h: Harness, **fields) -> str:
    reply = h.request(OpenSessionRequest(width=32, height=32, fps=30.0, pixel_format="bgr24", **fields))
    assert not isinstance(reply, ErrorReply), reply
    return reply.session_id


def test_hello_and_status_show_the_engines_cache_settings(harness):
    want = {"num_kv_cache": 8, "num_sink": 2, "sink_threshold": -1.0, "rope_refresh_frames": 0}
    assert harness.request(HelloRequest()).cache.model_dump() == want
    assert harness.request(StatusRequest()).cache.model_dump() == want
    assert harness.request(HelloRequest()).compat == harness.request(StatusRequest()).compat == "clean"


def test_a_prompt_that_fails_to_encode_is_reported_and_changes_nothing(harness):
    session_id = open_session(harness, preset="anime")
    before = harness.request(StatusRequest(session_id=session_id)).sessions[0].params
    reply = harness.request(SetParamsRequest(session_id=session_id, prompt=UNENCODABLE))
    assert reply.pending and reply.params.prompt == UNENCODABLE  # acknowledged at once, queued
    event = harness.next_event(lambda e: e.event == "error" and e.session_id == session_id)
    assert "prompt could not be encoded" in event.message and "rejected" in event.message
    assert harness.request(StatusRequest(session_id=session_id)).sessions[0].params == before
    # the next change plans from what the session really runs with, not from the refused prompt
    reply = harness.request(SetParamsRequest(session_id=session_id, steps=1))
    assert reply.params.prompt == before.prompt and reply.params.steps == 1
    harness.wait_status(session_id, lambda s: s.params.steps == 1 and s.pending_changes == 0)


def test_a_busy_compute_loop_still_answers_control_requests_at_once(harness):
    session_id = open_session(harness, preset="anime")
    stand_in = harness.engine.sessions[-1]
    stand_in.gate = threading.Event()
    ring = FrameRing.open(f"sdlive-{session_id}-in")
    try:
        ring.write(np.zeros((32, 32, 3), np.uint8))
        assert stand_in.entered.wait(WAIT_S), "the loop never pushed the frame"
        # The compute loop is inside the model step until the gate opens: every reply below comes from the IO thread.
        assert harness.request(HelloRequest()).model == "stand-in"
        assert harness.request(HeartbeatRequest(session_id=session_id)).session_id == session_id
        reply = harness.request(SetPresetRequest(session_id=session_id, name="watercolor"))
        assert reply.pending and reply.preset == "watercolor"
        refused = harness.request(SetPresetRequest(session_id=session_id, name="no-such-preset"))
        assert isinstance(refused, ErrorReply) and refused.error.code == "unknown_preset"
        assert stand_in.params.prompt != reply.params.prompt  # not applied while the step runs
        stand_in.gate.set()
        harness.next_event(lambda e: e.event == "preset_changed" and e.preset == "watercolor")
        harness.wait_status(session_id, lambda s: s.preset == "watercolor" and s.params == reply.params)
    finally:
        ring.close()
