"""A preset's LoRA on a real daemon: a preset file names a LoRA (relative to its folder) and a strength; opening or
switching to it styles the session with it, switching away removes it; a missing or mismatched file is refused
with an error naming it, and the session runs on with its old style."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from sdlive.daemon.protocol.secret import secure_client
from sdlive.obs_bridge.client import DaemonError


@pytest.fixture
def lora_daemon(tmp_path, daemon_factory, write_tiny_lora):
    folder = tmp_path / "presets"
    write_tiny_lora(folder / "styles" / "ink.safetensors")
    write_tiny_lora(folder / "styles" / "big.safetensors", dim=1536)
    (folder / "ink.toml").write_text('prompt = "an ink drawing"\nlora = "styles/ink.safetensors"\nlora_strength = 0.8\n')
    (folder / "gone.toml").write_text('prompt = "a lost style"\nlora = "styles/missing.safetensors"\n')
    (folder / "big.toml").write_text('prompt = "a 1.3B style"\nlora = "styles/big.safetensors"\n')
    return daemon_factory("--preset-dir", str(folder))


def test_preset_loras_switch_live_and_bad_files_are_refused_by_name(lora_daemon, wait_for):
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"event")
    secure_client(sub)  # local auth is on by default: this session's secret (tests/conftest.py)
    sub.connect(lora_daemon.pub_address)
    events: list[dict] = []

    def seen(predicate) -> bool:
        while sub.poll(50):
            events.append(json.loads(sub.recv_multipart()[1]))
        return any(predicate(e) for e in events)

    rng = np.random.default_rng(0)
    try:
        with lora_daemon.client() as client:
            with pytest.raises(DaemonError, match=r"missing.safetensors not found"):
                client.open_session(width=64, height=48, fps=15, preset="gone")
            session = client.open_session(width=64, height=48, fps=15, preset="ink")
            try:
                for _ in range(9):
                    session.send(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
                for name, needle in (("gone", "missing.safetensors not found"),
                                     ("big", "big.safetensors does not fit this model")):  # fmt: skip
                    session.set_preset(name)
                    assert wait_for(lambda n=needle: seen(lambda e: e.get("event") == "error" and n in e.get("message", "")), 30), events
                    assert wait_for(lambda: client.status(session.session_id).sessions[0].preset == "ink", 10)
                session.set_preset("anime")  # no LoRA: the ink LoRA goes
                assert wait_for(lambda: seen(lambda e: e.get("event") == "preset_changed" and e.get("preset") == "anime"), 30)
                session.send(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
                assert client.status(session.session_id).sessions[0].preset == "anime"
            finally:
                session.close()
    finally:
        sub.close(0)
    assert "LoRA" in lora_daemon.log() and "ink.safetensors" in lora_daemon.log()
