"""A thread that fails takes the daemon down loudly, never silently (issue 13): on a real daemon process, a fault
in the IO thread or the compute loop publishes the dead sentinel (state "dead" with the reason) and the process
exits 1; a fault in an output release closes that output's session only, and the daemon keeps serving.

No client input reaches these faults any more (the one that did, a lone surrogate, is refused at decoding:
test_bad_requests.py), so they are injected through the narrow hook ``SDLIVE_TEST_FAULT`` (server/faults.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zmq

from sdlive.daemon.protocol.secret import secure_client
from sdlive.obs_bridge.client import DaemonClient, DaemonError


def subscribe(address: str) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    secure_client(sub)  # local auth is on by default: this session's secret (tests/conftest.py)
    sub.connect(address)
    return sub


def beats_until_dead(sub: zmq.Socket, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sub.poll(200):
            topic, body = sub.recv_multipart()
            beat = json.loads(body)
            if topic == b"daemon" and beat["state"] == "dead":
                return beat
    return None


@pytest.mark.parametrize(("place", "request_"), [("io", {"op": "hello"}), ("loop", {"op": "status"})])
def test_a_fault_in_the_io_thread_or_the_compute_loop_publishes_the_dead_sentinel_and_exits_1(
    daemon_factory, place, request_
):
    proc = daemon_factory(env={"SDLIVE_TEST_FAULT": place}, wait=False)
    sub = subscribe(proc.pub_address)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    secure_client(dealer)  # local auth is on by default: this session's secret (tests/conftest.py)
    dealer.connect(proc.control_address)
    try:
        if place == "loop":  # the loop answers status once the model is loaded: wait for the ready daemon's beat
            deadline = time.monotonic() + 120
            while not (sub.poll(200) and sub.recv_multipart()[0] == b"daemon") and time.monotonic() < deadline:
                assert proc.alive, proc.log()
        dealer.send(json.dumps(request_).encode())
        beat = beats_until_dead(sub, timeout_s=120)
        assert beat is not None, proc.log()
        assert f"injected fault in {place}" in beat["message"]
        assert proc.process.wait(30) == 1
        assert "Traceback" in proc.log() and "InjectedFault" in proc.log()
    finally:
        sub.close(0)
        dealer.close(0)


def test_a_fault_in_an_output_release_closes_that_session_only(daemon_factory):
    proc = daemon_factory(env={"SDLIVE_TEST_FAULT": "output"})
    sub = subscribe(proc.pub_address)
    try:
        with DaemonClient(proc.control_address, timeout_s=30.0) as client:
            session = client.open_session(width=64, height=64, fps=15, preset="anime")
            closed = None
            deadline = time.monotonic() + 60
            i = 0
            while closed is None and time.monotonic() < deadline:
                try:
                    if (session.pending_inputs or 0) <= 1:
                        session.send(np.full((64, 64, 3), i % 256, np.uint8))
                        i += 1
                    session.recv(timeout_s=0.05)
                except DaemonError:
                    time.sleep(0.05)  # the client saw the close first; the event says why
                while sub.poll(0):
                    topic, body = sub.recv_multipart()
                    event = json.loads(body)
                    if topic == b"event" and event["event"] == "session_closed":
                        closed = event
            assert closed is not None, proc.log()
            assert closed["session_id"] == session.session_id and "output failed" in closed["message"]
            assert proc.alive
            second = client.open_session(width=64, height=64, fps=15, preset="anime")  # the daemon serves on
            assert second.session_id in {s.session_id for s in client.status().sessions}
            second.close()
    finally:
        sub.close(0)
