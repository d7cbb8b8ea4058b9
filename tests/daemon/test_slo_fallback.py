"""SLO-aware mode choice: a session whose frames wait ≥ 0.5 s falls back to no-batch mode (lowest latency) and returns
to the stream batch once waits stay low; no frame is lost either way."""

import time

import numpy as np
import pytest

from sdlive.daemon.protocol.messages import NetEndpoints
from sdlive.daemon.server.items import NetCounters
from sdlive.daemon.server.session import Session
from sdlive.daemon.server.slo import SloGuard
from sdlive.daemon.server.transports import InputFrame, NetTransport


def test_guard_falls_back_at_the_slo_and_recovers_only_after_a_calm_period():
    guard = SloGuard(wait_s=0.5, recover_wait_s=0.25, recover_after_s=2.0)
    assert guard.observe(wait_s=0.1, now_s=0.0, wants_stream_batch=True) is None
    assert guard.observe(wait_s=0.49, now_s=0.1, wants_stream_batch=True) is None
    assert guard.observe(wait_s=0.5, now_s=0.2, wants_stream_batch=True) is False  # fall back
    assert guard.observe(wait_s=0.9, now_s=0.3, wants_stream_batch=True) is None  # stays
    assert guard.observe(wait_s=0.1, now_s=1.0, wants_stream_batch=True) is None  # calm starts
    assert guard.observe(wait_s=0.3, now_s=2.5, wants_stream_batch=True) is None  # a slow frame restarts the calm
    assert guard.observe(wait_s=0.1, now_s=3.0, wants_stream_batch=True) is None
    assert guard.observe(wait_s=0.1, now_s=4.9, wants_stream_batch=True) is None
    assert guard.observe(wait_s=0.1, now_s=5.0, wants_stream_batch=True) is True  # 2 s calm: back
    assert guard.switches == 2


def test_guard_leaves_sessions_alone_that_did_not_ask_for_the_stream_batch():
    guard = SloGuard()
    assert guard.observe(wait_s=5.0, now_s=0.0, wants_stream_batch=False) is None
    assert not guard.fallback


@pytest.fixture(scope="module")
def engine():
    from sdlive.daemon.engine import StreamEngine

    return StreamEngine.load("tiny", device="cpu")


def make_session(engine) -> Session:
    from sdlive.daemon.engine import SessionParams

    params = SessionParams(prompt="a watercolor painting", steps=2, stream_batch=True)
    engine_session = engine.open_session(width=64, height=64, params=params, pixel_format="bgr24")
    endpoints = NetEndpoints(input_address="tcp://127.0.0.1:1", output_address="tcp://127.0.0.1:2")
    transport = NetTransport(
        "slo-test", endpoints, pixel_format="bgr24", slots=4, counters=NetCounters(), send=lambda item: None
    )
    return Session(
        "slo-test", width=64, height=64, fps=15.0, pixel_format="bgr24", client=None,
        engine_session=engine_session, transport=transport, preset=None,
    )  # fmt: skip


def push(session: Session, pixels: np.ndarray, capture_ns: int) -> list[int]:
    return [o.index for o in session.push(InputFrame(pixels, capture_ns, capture_ns))]


def test_late_frames_switch_the_session_to_no_batch_and_calm_ones_switch_it_back_without_losing_frames(engine):
    session = make_session(engine)
    session.slo.recover_after_s = 0.3
    frames = np.random.default_rng(0).integers(0, 255, size=(41, 64, 64, 3), dtype=np.uint8)
    indices: list[int] = []
    for i in range(13):  # on time
        indices += push(session, frames[i], time.monotonic_ns())
    assert session.engine_session.params.stream_batch
    late = time.monotonic_ns() - 800_000_000  # these frames waited 0.8 s
    for i in range(13, 21):
        indices += push(session, frames[i], late)
    assert not session.engine_session.params.stream_batch
    deadline = time.monotonic() + 10
    i = 21
    while session.engine_session.params.stream_batch is False and time.monotonic() < deadline and i < 41:
        indices += push(session, frames[i], time.monotonic_ns())
        i += 1
        time.sleep(0.05)
    assert session.engine_session.params.stream_batch, "did not return to the stream batch after calm waits"
    for j in range(i, 41):
        indices += push(session, frames[j], time.monotonic_ns())
    indices += [o.index for o in session.engine_session.flush()]
    assert indices == list(range(41))
    assert session.slo.switches == 2
