"""The OBS script's pieces that run outside OBS's render path, tested in this process (libobs and OBS's SWIG module
import without a running OBS): the stdlib ZMTP 3 DEALER against real ZeroMQ ROUTERs (a pyzmq one that sends ZMTP
heartbeat PINGs and long frames, and the real daemon), request/reply matching, timeouts, and the pure helpers."""

from __future__ import annotations

import importlib
import json
import sys
import threading
from pathlib import Path

import pytest
import zmq

OBS_SCRIPTING = Path("/usr/lib/x86_64-linux-gnu/obs-scripting")
SCRIPT_DIR = Path(__file__).resolve().parents[2] / "obs_bridge"


@pytest.fixture(scope="module")
def script():
    if not (OBS_SCRIPTING / "obspython.py").exists():
        pytest.skip("OBS's obspython module is not installed (Debian: apt-get install obs-studio)")
    sys.path.append(str(OBS_SCRIPTING))
    sys.path.insert(0, str(SCRIPT_DIR))
    try:
        module = importlib.import_module("obs_script")
    except (ImportError, OSError) as exc:
        pytest.skip(f"the OBS script cannot be imported outside OBS here: {exc}")
    finally:
        sys.path.remove(str(SCRIPT_DIR))
    return module


class Router:
    """A pyzmq ROUTER answering every request with its op, id and a padding of ``pad`` bytes; ZMTP heartbeats on."""

    def __init__(self, pad: int = 0, *, silent_ops=()):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 50)  # the server PINGs us every 50 ms: the client must PONG
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 1000)  # and drops us after 1 s without any traffic from us
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.pad = pad
        self.silent_ops = set(silent_ops)
        self.seen: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, raw = self.sock.recv_multipart()
            msg = json.loads(raw)
            self.seen.append(msg)
            if msg["op"] in self.silent_ops:
                continue
            reply = {"ok": True, "id": msg.get("id"), "op": msg["op"], "pad": "x" * self.pad}
            if msg["op"] == "fail":
                reply = {"ok": False, "id": msg.get("id"), "error": {"code": "unknown_op", "message": "nope"}}
            self.sock.send_multipart([ident, json.dumps(reply).encode()])

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.sock.close(0)
        self.ctx.term()


@pytest.mark.parametrize("pad", [0, 300, 70000])  # short frames, long (8-byte size) frames, several TCP reads
def test_stdlib_client_round_trips_with_a_zeromq_router(script, pad):
    r = Router(pad)
    try:
        c = script.StdlibControl(r.address, "tok")
        for i in range(3):
            reply = c.request("hello", client="test", n=i)
            assert reply["op"] == "hello" and len(reply["pad"]) == pad
        assert [m["n"] for m in r.seen] == [0, 1, 2]
        assert all(m["token"] == "tok" for m in r.seen)
        c.close()
    finally:
        r.close()


def test_stdlib_client_handles_zmtp_pings_and_idle_disconnects(script):
    import time

    r = Router()
    try:
        c = script.StdlibControl(r.address, None)
        c.request("hello")
        sock = c._sock
        for _ in range(6):  # ~6 PINGs queue up between requests: drained (PONG sent) before each request
            time.sleep(0.3)
            assert c.request("status")["op"] == "status"
        assert c._sock is sock, "the connection dropped although traffic never stopped for 1 s"
        time.sleep(1.6)  # idle past the server's heartbeat timeout: it hangs up on us
        assert c.request("status")["op"] == "status"  # noticed before sending: a fresh connection, no error
        c.close()
    finally:
        r.close()


def test_error_reply_raises_with_the_code_and_timeout_raises_control_error(script):
    r = Router(silent_ops={"slow"})
    try:
        c = script.StdlibControl(r.address, None)
        with pytest.raises(script.DaemonReplyError) as err:
            c.request("fail")
        assert err.value.code == "unknown_op"
        with pytest.raises(script.ControlError, match="no reply to 'slow'"):
            c.request("slow", timeout_s=0.3)
        assert c.request("hello")["op"] == "hello"  # a fresh connection after the timeout
        c.close()
    finally:
        r.close()


def test_refused_connection_is_a_control_error_naming_the_address(script):
    from sdlive.obs_bridge.obsws_tools import free_port

    addr = f"tcp://127.0.0.1:{free_port()}"
    c = script.StdlibControl(addr, None)
    with pytest.raises(script.ControlError, match="cannot connect to " + addr):
        c.request("hello", timeout_s=0.5)


def test_non_tcp_address_needs_pyzmq(script):
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        script.StdlibControl("ipc:///tmp/x", None)


def test_stdlib_client_speaks_to_the_real_daemon(script, obs_daemon):
    c = script.StdlibControl(obs_daemon.control_address, None)
    hello = c.request("hello", client="obs:test", protocol=script.PROTOCOL)
    assert hello["protocol"] == script.PROTOCOL
    presets = c.request("list_presets")["presets"]  # a reply of several KiB
    assert "anime" in [p["name"] for p in presets]
    with pytest.raises(script.DaemonReplyError) as err:
        c.request("heartbeat", session_id="no-such-session")
    assert err.value.code == "unknown_session"
    c.close()


def test_session_size_rounds_down_to_multiples_of_16(script):
    assert script.session_size(1920, 1080) == (1920, 1072)
    assert script.session_size(1280, 720) == (1280, 720)
    assert script.session_size(8, 8) == (16, 16)


def test_preset_files_give_names_and_default_hotkeys(script):
    found = script.scan_preset_files()
    assert found["anime"] == "ctrl+shift+1"
    assert script._key_combo_data("ctrl+shift+1") == [{"control": True, "shift": True, "key": "OBS_KEY_1"}]
    assert script._key_combo_data("F13") == [{"key": "OBS_KEY_F13"}]
    assert script._key_combo_data("ctrl+") == []
