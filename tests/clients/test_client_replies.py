"""The client library speaks the wire contract's models: against a stand-in ROUTER that decodes every request with
the daemon's ``decode_request`` and answers with reply models, each ``DaemonClient`` method returns its op's reply
model, an error reply raises ``DaemonError`` with its code, and another protocol version is refused."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zmq

from sdlive.daemon.protocol.constants import PROTOCOL_VERSION
from sdlive.daemon.protocol.errors import ErrorCode, ProtocolError
from sdlive.daemon.protocol.messages import (
    Capabilities,
    CloseSessionReply,
    HeartbeatReply,
    HelloReply,
    ListPresetsReply,
    PresetInfo,
    SessionStats,
    SetParamsReply,
    SetPresetReply,
    ShutdownReply,
    StatusReply,
    decode_request,
    error_reply,
    ok_reply,
)
from sdlive.obs_bridge.client import DaemonClient, DaemonError

STATS = SessionStats(session_id="s1", width=64, height=64, fps=15.0, pixel_format="bgr24", latency_frames=8,
                     preset="anime", client="test", frames_in=3)


class StandIn(threading.Thread):
    """A ROUTER answering each op with a fixed reply model (``protocol`` sets hello's version)."""

    def __init__(self, protocol: str = PROTOCOL_VERSION) -> None:
        super().__init__(daemon=True)
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.protocol = protocol
        self.ops: list[str] = []
        self._halt = threading.Event()

    def reply(self, op: str, session_id: str | None):
        if session_id == "gone":
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, "no session 'gone'")
        return {
            "hello": HelloReply(protocol=self.protocol, daemon_version="0", model="tiny", device="cpu",
                                capabilities=Capabilities(max_sessions=2)),
            "list_presets": ListPresetsReply(presets=[PresetInfo(name="anime", prompt="anime style", index=0)],
                                             problems=["broken.toml:2: steps"]),
            "status": StatusReply(daemon_version="0", model="tiny", device="cpu", uptime_s=1.0, max_sessions=2,
                                  sessions=[STATS]),
            "set_preset": SetPresetReply(session_id=session_id or "", preset="anime"),
            "set_params": SetParamsReply(session_id=session_id or ""),
            "close_session": CloseSessionReply(session_id=session_id or ""),
            "heartbeat": HeartbeatReply(session_id=session_id),
            "shutdown": ShutdownReply(),
        }[op]

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                if not self.sock.poll(50):
                    continue
                identity, raw = self.sock.recv_multipart()
                try:
                    request = decode_request(raw)
                    self.ops.append(request.op)
                    payload = ok_reply(self.reply(request.op, getattr(request, "session_id", None)), id=request.id)
                except ProtocolError as exc:
                    payload = error_reply(exc.code, exc.message, id=exc.id)
                self.sock.send_multipart([identity, payload])
        finally:
            self.sock.close(linger=0)  # closed on the thread that uses it (ZeroMQ sockets are not thread-safe)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    server.start()
    yield server
    server.stop()


def test_every_method_returns_its_ops_reply_model(stand_in):
    with DaemonClient(stand_in.address, timeout_s=5) as client:
        hello = client.hello()
        assert isinstance(hello, HelloReply) and hello.capabilities.max_sessions == 2
        listing = client.list_presets()
        assert isinstance(listing, ListPresetsReply)
        assert [p.name for p in listing.presets] == ["anime"] and listing.problems == ["broken.toml:2: steps"]
        status = client.status()
        assert isinstance(status, StatusReply) and status.sessions == [STATS]
        assert isinstance(status.sessions[0], SessionStats) and status.sessions[0].frames_in == 3
        changed = client.set_preset("s1", "anime")
        assert isinstance(changed, SetPresetReply) and changed.pending  # queued on receipt
        assert isinstance(client.set_params("s1", steps=1), SetParamsReply)
        assert isinstance(client.heartbeat("s1"), HeartbeatReply)
        assert isinstance(client.close_session("s1"), CloseSessionReply)
        assert isinstance(client.shutdown(), ShutdownReply)
    assert stand_in.ops == ["hello", "list_presets", "status", "set_preset", "set_params", "heartbeat",
                            "close_session", "shutdown"]


def test_an_error_reply_raises_daemon_error_with_its_code(stand_in):
    with DaemonClient(stand_in.address, timeout_s=5) as client:
        with pytest.raises(DaemonError) as err:
            client.set_preset("gone", "anime")
        assert err.value.code == "unknown_session" and "gone" in err.value.message
        assert isinstance(client.heartbeat(), HeartbeatReply)  # the channel goes on after an error


def test_another_protocol_version_is_refused():
    server = StandIn(protocol="sdlive/0")
    server.start()
    try:
        with DaemonClient(server.address, timeout_s=5) as client, pytest.raises(DaemonError, match="upgrade sdlive"):
            client.hello()
    finally:
        server.stop()
