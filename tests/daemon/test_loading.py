"""A loading daemon answers at once (issue 16): from the moment its sockets are bound, while torch imports and the
model builds and warms up (seconds even for tiny, minutes for a real model), hello and status say
state "loading" with the loader's stage and the time spent, list_presets works, what needs the model gets a
`loading` error naming the model and the wait, and a shutdown request stops the load. Then state "ready"."""

from __future__ import annotations

import json
import time

import pytest
import zmq

from sdlive.daemon.protocol.secret import secure_client

READY_TIMEOUT_S = 120.0


class Raw:
    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        secure_client(self.sock)  # local auth is on by default: this session's secret (tests/conftest.py)
        self.sock.connect(address)
        self.asked = 0

    def ask(self, request: dict, timeout_s: float = 30.0) -> dict:
        self.asked += 1
        self.sock.send(json.dumps({**request, "id": self.asked}).encode())
        while True:  # skip the replies to first_answer's earlier polls
            assert self.sock.poll(int(timeout_s * 1000)), f"no reply to {request}"
            reply = json.loads(self.sock.recv_multipart()[-1])
            if reply["id"] == self.asked:
                return reply

    def close(self) -> None:
        self.sock.close(0)


def first_answer(raw: Raw, proc) -> dict:
    """The first hello the starting daemon answers (polled every 20 ms, so it comes within the load)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.alive, proc.log()
        raw.sock.send(b'{"op": "hello"}')
        if raw.sock.poll(20):
            return json.loads(raw.sock.recv_multipart()[-1])
    pytest.fail(f"no hello within 60 s:\n{proc.log()}")


def test_hello_and_status_answer_while_loading_then_say_ready(daemon_factory):
    proc = daemon_factory(wait=False)
    raw = Raw(proc.control_address)
    try:
        hello = first_answer(raw, proc)
        assert hello["ok"] and hello["state"] == "loading", hello
        assert hello["loading"]["model"] == "tiny" and hello["loading"]["elapsed_s"] >= 0 and hello["loading"]["stage"]
        # in order on one socket: while a later hello still says loading, the requests before it were answered so
        status = raw.ask({"op": "status"})
        opened = raw.ask({"op": "open_session", "width": 64, "height": 64, "fps": 15})
        presets = raw.ask({"op": "list_presets"})
        again = raw.ask({"op": "hello"})
        if again["state"] == "loading":
            assert status["ok"] and status["state"] == "loading" and status["sessions"] == []
            assert status["loading"]["elapsed_s"] >= hello["loading"]["elapsed_s"]
            assert opened["error"]["code"] == "loading"
            assert "tiny is loading" in opened["error"]["message"] and "retry" in opened["error"]["message"]
            assert presets["ok"] and {p["name"] for p in presets["presets"]} >= {"anime"}
        stages = {hello["loading"]["stage"]}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while again["state"] == "loading" and time.monotonic() < deadline:
            stages.add(again["loading"]["stage"])
            time.sleep(0.05)
            again = raw.ask({"op": "hello"})
        assert again["state"] == "ready" and again["loading"] is None, again
        assert len(stages) >= 2, stages  # the progress moved: the loader's stages, then "warming up"
        status = raw.ask({"op": "status"})
        assert status["state"] == "ready" and status["loading"] is None
    finally:
        raw.close()


def test_shutdown_while_loading_stops_the_load(daemon_factory):
    proc = daemon_factory(wait=False)
    raw = Raw(proc.control_address)
    try:
        hello = first_answer(raw, proc)
        if hello["state"] != "loading":
            pytest.skip("the model loaded before the first hello: nothing to interrupt")
        assert raw.ask({"op": "shutdown"})["ok"]
        proc.process.wait(30)  # long before a load + warm-up would have finished on this machine
        assert proc.process.returncode == 0, proc.log()
        assert "while loading the model" in proc.log()
    finally:
        raw.close()
