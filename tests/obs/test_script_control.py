"""The OBS script's pieces that run outside OBS's render path, tested in this process (libobs and OBS's SWIG module
import without a running OBS): its ZMTP 3 DEALER against real ZeroMQ ROUTERs (a pyzmq one that sends ZMTP heartbeat
PINGs and long frames, and the real daemon), request/reply matching, timeouts; a filter's daemon link against a
scripted ROUTER; the wire contract loaded by path; and the pure helpers."""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
import types
import uuid

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from .harness import SCRIPT_DIR, free_port, wait_until

OBS_SCRIPTING = "/usr/lib/x86_64-linux-gnu/obs-scripting"


@pytest.fixture(scope="module")
def script() -> types.SimpleNamespace:
    """The script folder's modules, imported the way OBS imports them (the folder on sys.path)."""
    sys.path.append(OBS_SCRIPTING)
    sys.path.insert(0, str(SCRIPT_DIR))
    try:
        modules = {name: importlib.import_module(f"sdlive_{name}")
                   for name in ("control", "contract", "presets", "render", "hotkeys", "link", "settings", "secret")}
    except (ImportError, OSError) as exc:
        pytest.skip(f"the OBS script cannot be imported outside OBS here (needs Debian's obs-studio): {exc}")
    finally:
        sys.path.remove(str(SCRIPT_DIR))
    return types.SimpleNamespace(**modules)


class Router:
    """A pyzmq ROUTER answering every request with its op, id and a padding of ``pad`` bytes; ZMTP heartbeats on.
    ``handler(msg)`` may return a reply body of its own (None: no reply at all)."""

    def __init__(self, pad: int = 0, *, silent_ops=(), handler=None, port: int | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 50)  # the server PINGs us every 50 ms: the client must PONG
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 1000)  # and drops us after 1 s without any traffic from us
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        if port is None:
            port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        else:
            self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.port = port
        self.address = f"tcp://127.0.0.1:{port}"
        self.pad = pad
        self.silent_ops = set(silent_ops)
        self.handler = handler
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
            if self.handler is not None:
                body = self.handler(msg)
                if body is None:
                    continue
                reply = {"ok": True, "id": msg.get("id"), **body}
            self.sock.send_multipart([ident, json.dumps(reply).encode()])

    def wait_disconnected(self, timeout_s: float) -> bool:
        """True once a peer's connection dropped (the monitor's EVENT_DISCONNECTED)."""
        if not self.monitor.poll(int(timeout_s * 1000)):
            return False
        return recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()


# ---------------------------------------------------------------------------------------------- the ZMTP client


@pytest.mark.parametrize("pad", [0, 300, 70000])  # short frames, long (8-byte size) frames, several TCP reads
def test_client_round_trips_with_a_zeromq_router(script, pad):
    r = Router(pad)
    try:
        c = script.control.StdlibControl(r.address, "tok")
        for i in range(3):
            reply = c.request("hello", client="test", n=i)
            assert reply["op"] == "hello" and len(reply["pad"]) == pad
        assert [m["n"] for m in r.seen] == [0, 1, 2]
        assert all(m["token"] == "tok" for m in r.seen)
        c.close()
    finally:
        r.close()


def test_client_handles_zmtp_pings_and_idle_disconnects(script):
    r = Router()
    try:
        c = script.control.StdlibControl(r.address, None)
        c.request("hello")
        sock = c._sock
        for _ in range(6):  # ~6 PINGs queue up between requests: drained (PONG sent) before each request
            time.sleep(0.3)
            assert c.request("status")["op"] == "status"
        assert c._sock is sock, "the connection dropped although traffic never stopped for 1 s"
        assert r.wait_disconnected(5), "the router never dropped the idle client"  # no PONGs while idle: dropped
        # the closed connection is noticed before sending, or the request is asked again on a fresh one: no error
        assert c.request("status")["op"] == "status"
        c.close()
    finally:
        r.close()


def test_a_daemon_restarted_on_the_same_address_is_reached_without_an_error(script):
    r = Router()
    c = script.control.StdlibControl(r.address, None)
    try:
        assert c.request("hello")["op"] == "hello"
        r.close()
        r = Router(port=r.port)  # the same address; the client still holds the connection to the old one
        for _ in range(3):
            assert c.request("status")["op"] == "status"
    finally:
        c.close()
        r.close()


def test_error_reply_raises_with_the_code_and_timeout_raises_control_error(script):
    r = Router(silent_ops={"slow"})
    try:
        c = script.control.StdlibControl(r.address, None)
        with pytest.raises(script.control.DaemonReplyError) as err:
            c.request("fail")
        assert err.value.code == "unknown_op"
        with pytest.raises(script.control.ControlError, match="no reply to 'slow'"):
            c.request("slow", timeout_s=0.3)
        assert c.request("hello")["op"] == "hello"  # a fresh connection after the timeout
        c.close()
    finally:
        r.close()


def test_refused_connection_is_a_control_error_naming_the_address(script):
    addr = f"tcp://127.0.0.1:{free_port()}"
    c = script.control.StdlibControl(addr, None)
    with pytest.raises(script.control.RefusedError, match="cannot connect to " + addr):  # a ControlError
        c.request("hello", timeout_s=0.5)


def test_a_closed_peer_is_noticed_between_requests_and_abort_cuts_a_waiting_request(script):
    r = Router(silent_ops={"wait"})
    try:
        c = script.control.StdlibControl(r.address, None)
        c.request("hello")
        assert not c.peer_closed()
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("t", _timed(lambda: c.request("wait", timeout_s=5))))
        t.start()
        time.sleep(0.2)
        c.abort()
        t.join(5)
        assert done["t"][1] < 1.0 and isinstance(done["t"][0], script.control.ControlError)
        c.request("hello")  # a fresh connection
    finally:
        r.close()
    assert wait_until(c.peer_closed, 5, "the closed router to be noticed")


def _timed(fn):
    t0 = time.monotonic()
    try:
        fn()
        return None, time.monotonic() - t0
    except Exception as exc:  # noqa: BLE001
        return exc, time.monotonic() - t0


def test_a_curve_daemon_is_a_clear_error_naming_the_relay(script):
    """A daemon with --token runs CurveZMQ: the filter's stdlib ZMTP cannot open it."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    public, secret = zmq.curve_keypair()
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        c = script.control.StdlibControl(f"tcp://127.0.0.1:{port}", None)
        with pytest.raises(script.control.ControlError, match="--token .*CurveZMQ.*sdlive relay"):
            c.request("hello", timeout_s=1.0)
    finally:
        sock.close(0)
        ctx.term()


def test_non_tcp_address_is_refused_with_the_form_it_takes(script):
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        script.control.StdlibControl("ipc:///tmp/x", None)


def test_client_speaks_to_the_real_daemon(script, obs_daemon):
    """The default daemon has local auth: the script reads this user's local secret itself (the session's
    SDLIVE_SECRET_FILE, tests/conftest.py) through the daemon's own secret.py and does the PLAIN handshake."""
    c = script.control.StdlibControl(obs_daemon.control_address, None)
    version = script.contract.constants.PROTOCOL_VERSION
    hello = c.request("hello", client="obs:test", protocol=version)
    assert hello["protocol"] == version and hello["security"] == "plain"
    presets = c.request("list_presets")["presets"]  # a reply of several KiB
    assert "anime" in [p["name"] for p in presets]
    with pytest.raises(script.control.DaemonReplyError) as err:
        c.request("heartbeat", session_id="no-such-session")
    assert err.value.code == "unknown_session"
    c.close()


def test_a_wrong_or_missing_local_secret_is_one_line_naming_the_fix(script, obs_daemon, tmp_path, monkeypatch):
    """Another user's secret (a different secret file, as OBS run by another account would read) is refused by the
    daemon with a ZMTP ERROR, and no secret file at all is named before anything is sent: each a LocalAuthError
    saying what to do, at once, not a timeout; the daemon counts the refusal and keeps serving its owner."""
    from sdlive.daemon.protocol.secret import LOCAL_SECRET_ENV, ensure_local_secret

    session_file = os.environ[LOCAL_SECRET_ENV]
    other = tmp_path / "other" / "secret"
    ensure_local_secret(other)
    monkeypatch.setenv(LOCAL_SECRET_ENV, str(other))
    c = script.control.StdlibControl(obs_daemon.control_address, None)
    started = time.monotonic()
    with pytest.raises(script.control.LocalAuthError, match=r"refused this user's local secret .*same user") as err:
        c.request("hello", timeout_s=5.0)
    assert time.monotonic() - started < 2.5
    assert str(other) in str(err.value) and script.secret.secret_path() == str(other)
    monkeypatch.setenv(LOCAL_SECRET_ENV, str(tmp_path / "nowhere" / "secret"))
    with pytest.raises(script.control.LocalAuthError, match=r"local auth on .*no secret file at .*nowhere.*same user"):
        c.request("hello", timeout_s=5.0)
    wrong = script.control.StdlibControl(obs_daemon.control_address, None, secret=lambda: "a-guess")
    with pytest.raises(script.control.LocalAuthError, match="refused"):
        wrong.request("shutdown", timeout_s=5.0)
    monkeypatch.setenv(LOCAL_SECRET_ENV, session_file)
    owner = script.control.StdlibControl(obs_daemon.control_address, None)
    status = owner.request("status")
    assert status["requests"]["refused_handshakes"] >= 2
    owner.close()


def test_a_daemon_without_local_auth_is_reached_with_null(script, daemon_factory):
    """--no-local-auth: the daemon greets NULL and the script answers NULL, though this user's secret exists."""
    d = daemon_factory("--no-local-auth")
    c = script.control.StdlibControl(d.control_address, None)
    assert c.request("hello")["security"] == "none"
    c.close()


# ------------------------------------------------------------------------------------------ one filter's link


class FakeDaemon:
    """A scripted daemon for one DaemonLink: real rings, replies per op, and the first ``drop`` set_preset requests
    left unanswered (a lost message)."""

    def __init__(self, *, protocol: str, drop: int = 0):
        from sdlive.daemon.protocol.ring import FrameRing

        self.protocol = protocol
        self.drop = drop
        tag = uuid.uuid4().hex[:8]
        self.rings = [FrameRing.create(f"sdlive-test-{tag}-{d}", width=32, height=32) for d in ("in", "out")]
        self.router = Router(handler=self.reply)

    def reply(self, msg: dict) -> dict | None:
        op = msg["op"]
        if op == "hello":
            return {"protocol": self.protocol, "heartbeat_interval_s": 0.2, "heartbeat_liveness": 3}
        if op == "open_session":
            return {"session_id": "s1", "input_ring": self.rings[0].name, "output_ring": self.rings[1].name,
                    "preset": msg.get("preset")}
        if op == "list_presets":
            return {"presets": [{"name": "a"}, {"name": "b", "hotkey": "ctrl+shift+9"}]}
        if op == "set_preset" and self.drop > 0:
            self.drop -= 1
            return None
        if op in ("set_preset", "set_params"):
            return {"session_id": msg["session_id"], "pending": True}
        return {}

    def ops(self, op: str) -> list[dict]:
        return [m for m in self.router.seen if m["op"] == op]

    def close(self) -> None:
        self.router.close()
        for r in self.rings:
            r.close()
            r.unlink()


def _link(script, daemon: FakeDaemon, installed: list):
    settings = script.settings.FilterSettings(address=daemon.router.address)

    def install(sess):
        installed.append(sess)
        return installed[-2] if len(installed) > 1 else None

    link = script.link.DaemonLink("test", lambda: settings, lambda: (32, 32), install, fps=lambda: 30.0)
    link.start()
    return link


def test_link_asks_again_when_a_change_got_no_reply(script):
    """A set_preset that gets no reply is not a dead daemon: it is asked again, and the session stays."""
    d = FakeDaemon(protocol=script.contract.constants.PROTOCOL_VERSION, drop=1)
    installed: list = []
    link = _link(script, d, installed)
    try:
        sess = wait_until(lambda: installed and installed[-1], 10, "the session to open")
        assert script.link.state.daemon_presets == {"a": None, "b": "ctrl+shift+9"}  # from list_presets
        link.request_preset("b")
        wait_until(lambda: sess.preset == "b", 10, "the preset change to be answered")
        assert [m["name"] for m in d.ops("set_preset")] == ["b", "b"]
        assert len(d.ops("open_session")) == 1 and link.state == "connected"
        wait_until(lambda: len(d.ops("heartbeat")) >= 3, 5, "heartbeats at the daemon's 0.2 s interval")
        assert len(d.ops("open_session")) == 1  # the same session all along
    finally:
        link.stop()
        wait_until(lambda: link.state == "stopped", 10, "the worker to stop")
        d.close()
    assert [m["session_id"] for m in d.ops("close_session")] == ["s1"]


def test_link_refuses_a_daemon_of_another_protocol(script):
    d = FakeDaemon(protocol="sdlive/0")
    link = _link(script, d, [])
    try:
        wait_until(lambda: link.state == "disconnected", 10, "the link to give up")
        assert "upgrade sdlive on both sides" in link.last_error
        assert not d.ops("open_session")
    finally:
        link.stop()
        d.close()


# ------------------------------------------------------------------------------- contract, presets, helpers


def test_the_wire_contract_is_loaded_by_path_without_the_protocol_package(script):
    """constants.py and ring.py come from the checkout's daemon/protocol as a synthetic package: ring's relative
    import of constants works, and no sdlive.daemon.protocol (pydantic) copy is made for the script."""
    contract = script.contract
    assert contract.ring.PIXEL_FORMATS is contract.constants.PIXEL_FORMATS
    assert contract.constants.__name__ == f"{contract.PACKAGE}.constants"
    assert contract.PROTOCOL_DIR == str(SCRIPT_DIR.parents[1] / "daemon" / "protocol")
    assert sys.modules[contract.PACKAGE].__path__ == [contract.PROTOCOL_DIR]


def test_a_missing_contract_names_every_folder_tried_and_the_fix(script, tmp_path):
    (tmp_path / "ring.py").write_text("")
    with pytest.raises(ImportError, match="sdlive obs install") as err:
        script.contract.load_protocol([str(tmp_path / "nowhere"), str(tmp_path)])
    assert f"{tmp_path} (no constants.py)" in str(err.value) and "nowhere (no constants.py, ring.py)" in str(err.value)


def test_filter_properties_take_their_bounds_and_defaults_from_the_contract(script):
    constants, s = script.contract.constants, script.settings
    defaults = s.FilterSettings()
    assert defaults.address == constants.DEFAULT_CONTROL_ADDRESS
    assert (defaults.steps, defaults.strength) == (constants.DEFAULT_STEPS, constants.DEFAULT_NOISE_SCALE)
    assert s.MIN_STRENGTH > constants.NOISE_SCALE_MIN_EXCLUSIVE and s.MAX_STRENGTH == constants.NOISE_SCALE_MAX


def test_session_size_rounds_down_to_multiples_of_16(script):
    assert script.render.session_size(1920, 1080) == (1920, 1072)
    assert script.render.session_size(1280, 720) == (1280, 720)
    assert script.render.session_size(8, 8) == (16, 16)


def test_without_tomllib_the_preset_files_are_skipped_with_a_message_saying_what_follows(script, monkeypatch):
    monkeypatch.setattr(script.presets, "tomllib", None)  # OBS embedding Python 3.10
    found, problems = script.presets.read_preset_files()
    assert found == {} and len(problems) == 1
    assert "no tomllib (3.11+)" in problems[0] and "connected to the daemon" in problems[0]


def test_preset_files_give_names_and_default_hotkeys(script, tmp_path):
    found, problems = script.presets.read_preset_files()
    assert found["anime"] == "ctrl+shift+1" and not problems
    (tmp_path / "nameless.toml").write_text('prompt = "x"\nhotkey = "F13"\n')
    (tmp_path / "broken.toml").write_text('name = "unterminated\n')
    found, problems = script.presets.read_preset_files([str(tmp_path)])
    assert found == {"nameless": "F13"}  # the name defaults to the file name, as in the daemon
    assert len(problems) == 1 and "broken.toml" in problems[0]
    assert script.hotkeys.key_combo_data("ctrl+shift+1") == [{"control": True, "shift": True, "key": "OBS_KEY_1"}]
    assert script.hotkeys.key_combo_data("F13") == [{"key": "OBS_KEY_F13"}]
    assert script.hotkeys.key_combo_data("ctrl+") == []
