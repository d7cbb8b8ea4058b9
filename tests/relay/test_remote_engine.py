"""RemoteEngine: a relay's engine whose sessions are network sessions on a real remote daemon (tiny model, loopback
as the "other PC"): frames come back restyled and matched to their inputs, parameters follow. (A restarted remote
daemon: ``test_relay.py``.)"""

from __future__ import annotations

import time

import numpy as np
import pytest

from sdlive.daemon.protocol.params import GenerationParams
from sdlive.daemon.relay.remote import RemoteEngine
from sdlive.obs_bridge.client import DaemonClient, DaemonUnavailable

W, H = 64, 48
PARAMS = GenerationParams(prompt="a watercolor painting", steps=1, seed=3)


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(H, W, 3), dtype=np.uint8)
    return [np.roll(base, 2 * i, axis=1) for i in range(n)]


def run(session, clip: list[np.ndarray], fps: float = 20.0) -> dict[int, np.ndarray]:
    out = {}
    for frame in clip:
        for f in session.push(frame):
            out[f.index] = f.pixels
        time.sleep(1 / fps)
    for f in session.flush():
        out[f.index] = f.pixels
    return out


def test_remote_engine_describes_the_remote_daemon(daemon):
    engine = RemoteEngine(daemon.control_address)
    assert engine.model_name == "tiny"
    assert daemon.control_address in engine.device
    assert engine.compat == "upstream"
    assert engine.cache_policy is not None and engine.cache_policy.num_kv_cache == 6
    assert {p.name for p in engine.remote_presets} >= {"anime", "watercolor"}


def test_frames_come_back_restyled_and_matched_to_their_inputs(daemon):
    engine = RemoteEngine(daemon.control_address)
    session = engine.open_session(width=W, height=H, params=PARAMS, pixel_format="bgr24")
    try:
        clip = frames(29)
        got = run(session, clip)
        assert session.frames_in == 29 and session.frames_lost == 0
        assert len(got) >= 25, sorted(got)  # live pacing on the remote may drop a late frame or two
        assert all(p.shape == (H, W, 3) and p.dtype == np.uint8 for p in got.values())
        assert not any(np.array_equal(got[i], clip[i]) for i in got)  # restyled, not echoed
    finally:
        session.close()
    # The same frames through a network session opened directly on that daemon: the same restyle, frame for frame
    # (JPEG both ways in both cases, the same seed and model).
    with DaemonClient(daemon.control_address) as client:
        direct = client.open_session(width=W, height=H, fps=60, pixel_format="bgr24", params=PARAMS.model_dump(),
                                     transport="net", jpeg_quality=85)  # fmt: skip
        try:
            seen: dict[int, np.ndarray] = {}
            by_ts: dict[int, int] = {}
            for i, frame in enumerate(clip):
                ts = time.monotonic_ns()
                by_ts[ts] = i
                direct.send(frame, timestamp_ns=ts)
                time.sleep(1 / 20)
                while (r := direct.recv(timeout_s=0)) is not None:
                    seen[by_ts[r.timestamp_ns]] = r.pixels
            deadline = time.monotonic() + 5
            while len(seen) < len(got) and time.monotonic() < deadline:
                if (r := direct.recv(timeout_s=0.1)) is not None:
                    seen[by_ts[r.timestamp_ns]] = r.pixels
        finally:
            direct.close()
    common = sorted(set(seen) & set(got))
    assert len(common) >= 20
    for i in common:
        assert np.array_equal(seen[i], got[i]), i


def test_params_follow_and_bad_values_change_nothing(daemon, wait_for):
    engine = RemoteEngine(daemon.control_address)
    session = engine.open_session(width=W, height=H, params=PARAMS, pixel_format="bgr24")
    try:
        with pytest.raises(ValueError):
            session.set_params(steps=9)
        assert session.params.steps == 1
        session.set_params(prompt="an oil painting", steps=2)
        assert session.params.prompt == "an oil painting" and session.params.steps == 2
        with DaemonClient(daemon.control_address) as client:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                run(session, frames(4, seed=1))
                remote = [s for s in client.status().sessions if s.client == "sdlive-relay"]
                if remote and remote[0].params is not None and remote[0].params.steps == 2:
                    break
            assert remote and remote[0].params.prompt == "an oil painting"
    finally:
        session.close()  # returns at once; the remote session closes in the background
    with DaemonClient(daemon.control_address) as client:
        assert wait_for(lambda: not [s for s in client.status().sessions if s.client == "sdlive-relay"], 10)


def test_an_unreachable_remote_is_a_clear_error():
    with pytest.raises(DaemonUnavailable, match="127.0.0.1:9"):
        RemoteEngine("tcp://127.0.0.1:9", timeout_s=0.5)
