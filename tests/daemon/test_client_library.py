"""The client library's boundaries: exact errors for bad frames and bad arguments, a clear DaemonUnavailable,
idempotent close, and heartbeats that keep an idle session alive."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sdlive.daemon.protocol.constants import STEPS_MAX
from sdlive.obs_bridge.client import DaemonClient, DaemonError, DaemonUnavailable, InvalidRequest


def test_no_daemon_raises_unavailable_naming_address_and_fix():
    started = time.monotonic()
    with DaemonClient("tcp://127.0.0.1:1", timeout_s=0.3) as client:
        with pytest.raises(DaemonUnavailable) as err:
            client.hello()
        with pytest.raises(DaemonUnavailable):  # a fresh socket after the timeout, same answer
            client.status()
    assert time.monotonic() - started < 5
    assert "tcp://127.0.0.1:1" in str(err.value) and "sdlive serve" in str(err.value)
    assert isinstance(err.value, DaemonError) and isinstance(err.value, ConnectionError)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"pixel_format": "yuv"}, "pixel_format"), ({"transport": "carrier-pigeon"}, "transport"),
     ({"jpeg_quality": 0}, "jpeg_quality"), ({"width": 8}, "width"), ({"params": {"steps": 9}}, "params.steps")],
)
def test_bad_open_session_arguments_are_refused_before_sending(kwargs, needle):
    with DaemonClient("tcp://127.0.0.1:1", timeout_s=0.3) as client:
        with pytest.raises(ValueError, match=needle):
            client.open_session(**{"width": 64, "height": 64, "fps": 30, **kwargs})


def test_out_of_range_values_are_refused_before_sending_with_the_daemons_code():
    with DaemonClient("tcp://127.0.0.1:1", timeout_s=0.3) as client:  # nothing listens: refused before sending
        with pytest.raises(InvalidRequest) as err:
            client.set_params("abc", steps=STEPS_MAX + 1)
        assert err.value.code == "bad_params" and isinstance(err.value, ValueError)
        with pytest.raises(InvalidRequest) as err:
            client.set_params("abc", colour="red")
        assert err.value.code == "bad_request" and "colour" in err.value.message
        with pytest.raises(InvalidRequest) as err:
            client.set_preset("not a session id!", "anime")
        assert err.value.code == "bad_request"


def test_bad_address_is_refused():
    with pytest.raises(ValueError, match="ZeroMQ endpoint"):
        DaemonClient("localhost:5557")


def test_frame_checks_idle_heartbeats_and_idempotent_close(daemon):
    with daemon.client() as client:
        session = client.open_session(width=64, height=48, fps=15, pixel_format="rgba")
        with pytest.raises(ValueError, match=r"unexpected frame dtype: float32 != uint8"):
            session.send(np.zeros((48, 64, 4), np.float32))
        with pytest.raises(ValueError, match=r"unexpected frame shape: \(64, 48, 4\) != \(48, 64, 4\)"):
            session.send(np.zeros((64, 48, 4), np.uint8))
        with pytest.raises(TypeError, match="numpy array"):
            session.send(b"\x00" * (64 * 48 * 4))
        assert session.recv(timeout_s=0.05) is None  # nothing sent yet: a short wait, then None
        # idle for longer than liveness x interval: the heartbeat thread keeps the session open
        time.sleep(4.0)
        assert session.session_id in {s.session_id for s in client.status().sessions}
        assert session.daemon_alive and not session.closed
        seq = session.send(np.zeros((48, 64, 4), np.uint8))
        assert seq == 1 and session.frames_sent == 1
        session.close()
        session.close()
        assert session.closed
        with pytest.raises(DaemonError) as err:
            session.send(np.zeros((48, 64, 4), np.uint8))
        assert err.value.code == "closed"
        assert session.session_id not in {s.session_id for s in client.status().sessions}


def _raises_within(session, error, timeout_s: float) -> DaemonError:
    """Send frames until ``session.send`` raises ``error``; fail if it keeps sending into the void."""
    frame = np.zeros((session.height, session.width, 3), np.uint8)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            session.send(frame)
        except error as exc:
            return exc
        except DaemonError:
            pass  # on the way (silent before lost): keep trying
        time.sleep(0.05)
    raise AssertionError(f"send() went on for {timeout_s} s without raising {error.__name__}")


def test_a_killed_daemon_makes_send_raise_and_a_restarted_one_ends_the_session(daemon_factory):
    import signal

    from sdlive.obs_bridge.client import SessionLost

    proc = daemon_factory()
    with proc.client() as client:
        session = client.open_session(width=64, height=64, fps=10, pixel_format="bgr24")
        session.send(np.zeros((64, 64, 3), np.uint8))
        proc.process.send_signal(signal.SIGKILL)  # no sentinel, no closed rings: only the silence tells
        proc.process.wait(10)
        err = _raises_within(session, DaemonUnavailable, 8.0)
        assert "has not answered" in err.message and client.address in err.message
        with pytest.raises(DaemonUnavailable):
            session.recv(timeout_s=0.01)
        # a daemon on the same address again: it answers the heartbeat with unknown_session, for good
        daemon_factory(control=proc.control_address, pub=proc.pub_address)
        lost = _raises_within(session, SessionLost, 20.0)
        assert session.session_id in lost.message and lost.code == "unknown_session"
        session.close()


def test_a_stopping_daemon_ends_a_network_session_at_once_through_its_pub_sentinel(daemon_factory):
    from sdlive.obs_bridge.client import SessionLost

    proc = daemon_factory()
    with proc.client() as client:
        session = client.open_session(width=64, height=64, fps=10, pixel_format="bgr24", transport="net")
        session.send(np.zeros((64, 64, 3), np.uint8))
        time.sleep(0.3)  # the SUB is connected (a PUB drops what it sends before a subscriber joins)
        proc.stop()  # SIGTERM, and wait until the process is gone (slow on a loaded machine)
        exited = time.monotonic()
        err = _raises_within(session, SessionLost, 1.5)  # the sentinel came before the exit: well inside the 3 s
        assert time.monotonic() - exited < 1.5  # a heartbeat timeout would take
        assert err.code == "unknown_session" and "stopping" in err.message, err.message
        session.close()


def test_a_session_follows_preset_changes_made_elsewhere_and_the_daemons_figures(daemon, wait_for):
    with daemon.client() as client, daemon.client() as other:
        names = [p.name for p in client.list_presets().presets]
        session = client.open_session(width=64, height=64, fps=10, pixel_format="bgr24", preset=names[0])
        try:
            other.set_preset(session.session_id, names[1])  # another client (OBS hotkey, `sdlive preset`)
            assert wait_for(lambda: session.preset == names[1], 15), session.preset
            assert wait_for(lambda: session.daemon_stats is not None, 10)
            assert session.daemon_stats.session_id == session.session_id
        finally:
            session.close()


def _stream(session, frames: int = 12) -> int:
    """Send ``frames`` frames and count the outputs that come back."""
    got = 0
    for i in range(frames):
        session.send(np.full((session.height, session.width, 3), 20 * i % 256, np.uint8))
        got += session.recv(timeout_s=0.2) is not None
    deadline = time.monotonic() + 20
    while got < frames - session.latency_frames - 4 and time.monotonic() < deadline:
        got += session.recv(timeout_s=0.2) is not None
    return got


def test_a_token_daemon_is_reached_over_curve_on_every_socket_and_a_wrong_token_is_named(daemon_factory, wait_for):
    proc = daemon_factory(token="s3cret-token")
    with DaemonClient(proc.control_address, token="s3cret-token", timeout_s=30) as client:
        assert client.hello().model == "tiny" and client.secret == "s3cret-token"
        for transport in ("shm", "net"):  # net: the frame sockets are CurveZMQ too
            with client.open_session(width=64, height=64, fps=10, pixel_format="bgr24", transport=transport) as s:
                assert _stream(s) > 0, transport
                assert wait_for(lambda s=s: s.daemon_stats is not None, 10), "no PUB stats over CurveZMQ"
    started = time.monotonic()
    for token in ("wrong", None):
        with DaemonClient(proc.control_address, token=token, timeout_s=10) as bad:
            with pytest.raises(DaemonError) as err:
                bad.status()
            assert err.value.code == "unauthorized" and "token" in err.value.message, err.value
    assert time.monotonic() - started < 8  # named at the handshake, not after the timeouts


def test_local_clients_use_the_users_local_secret_by_themselves(daemon_factory, tmp_path, monkeypatch):
    from sdlive.daemon.protocol.secret import LOCAL_SECRET_ENV

    monkeypatch.setenv(LOCAL_SECRET_ENV, str(tmp_path / "runtime" / "sdlive" / "secret"))
    secured = daemon_factory()  # local auth by default: creates the secret file, every socket PLAIN with it
    with DaemonClient(secured.control_address, timeout_s=30) as client:
        assert client.secret is not None and client.security[0] == "plain"  # read from the file, nothing passed
        assert client.hello().security == "plain"
        with client.open_session(width=64, height=64, fps=10, pixel_format="bgr24") as s:
            assert _stream(s) > 0
    plain = daemon_factory("--no-local-auth")  # while the secret file exists: NULL, after one retry
    with DaemonClient(plain.control_address, timeout_s=30) as client:
        assert client.hello().model == "tiny" and client.secret is None
