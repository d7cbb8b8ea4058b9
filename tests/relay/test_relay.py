"""`sdlive relay` as a streamer runs it, with real processes on loopback standing in for two PCs: a remote daemon
(the GPU box, tiny model, with a token) and the relay, which local clients use exactly as a local daemon: shared
memory, the remote's presets, live preset switches, stats; it outlives a remote daemon restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sdlive.obs_bridge.client import DaemonClient, DaemonUnavailable

TOKEN = "relay-test-token-0123456789"
W, H = 64, 48


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    def __init__(self, tmp: Path, remote: str, *extra: str, token: str | None = TOKEN) -> None:
        self.control = f"tcp://127.0.0.1:{free_port()}"
        self.pub = f"tcp://127.0.0.1:{free_port()}"
        self.mirror = tmp / "mirror"
        self.log_path = tmp / "relay.log"
        args = ["relay", "--daemon", remote, "--no-ui", "--control", self.control, "--pub", self.pub,
                "--preset-mirror", str(self.mirror), *extra]  # fmt: skip
        if token:
            args += ["--token", token]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CONFIG_HOME": str(tmp / "config")}
        env.pop("SDLIVE_TOKEN", None)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from sdlive.obs_bridge.cli import main; main()", *args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60) -> DaemonClient:
        client = DaemonClient(self.control, timeout_s=2.0)
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, self.log()
            try:
                if client.hello().state == "ready":
                    return client
            except DaemonUnavailable:
                pass
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.2)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory, write_tiny_lora) -> Path:
    folder = tmp_path_factory.mktemp("remote-presets")
    (folder / "mine.toml").write_text('prompt = "a charcoal drawing"\nsteps = 1\n')
    write_tiny_lora(folder / "styles" / "ink.safetensors")  # on the remote's disk only
    (folder / "inked.toml").write_text('prompt = "an ink drawing"\nlora = "styles/ink.safetensors"\nlora_strength = 0.8\n')
    return folder


@pytest.fixture(scope="module")
def remote(tmp_path_factory, launch_daemon, preset_dir):
    """The GPU box: a daemon with a token and a preset folder of its own."""
    proc = launch_daemon(tmp_path_factory.mktemp("remote"), "--preset-dir", str(preset_dir), token=TOKEN)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, remote):
    proc = Relay(tmp_path_factory.mktemp("relay"), remote.control_address)
    yield proc
    proc.stop()


def clip(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(H, W, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(n)]


def stream(session, frames: list[np.ndarray], fps: float = 20.0) -> list:
    got = []
    for frame in frames:
        session.send(frame)
        time.sleep(1 / fps)
        while (out := session.recv(timeout_s=0)) is not None:
            got.append(out)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(got) < len(frames) - 6:
        if (out := session.recv(timeout_s=0.2)) is not None:
            got.append(out)
    return got


def remote_sessions(remote) -> list:
    with remote.client() as client:
        return [s for s in client.status().sessions if s.client == "sdlive-relay"]


def test_a_local_client_streams_through_the_relay_with_the_remote_presets(relay, remote, wait_for):
    client = relay.wait_ready()
    with remote.client() as rc:
        remote_presets = {p.name: p for p in rc.list_presets().presets}
    hello = client.hello()
    assert hello.model == "tiny" and remote.control_address in hello.device
    assert {p.name for p in client.list_presets().presets} == set(remote_presets)
    session = client.open_session(width=W, height=H, fps=20, pixel_format="bgr24", preset="watercolor")
    try:
        assert session.transport == "shm"  # the relay is local: shared memory, as with a local daemon
        got = stream(session, clip(25))
        assert len(got) >= 12, relay.log()
        assert all(f.pixels.shape == (H, W, 3) for f in got)
        [mirrored] = remote_sessions(remote)
        assert mirrored.params.prompt == remote_presets["watercolor"].prompt
        # A preset switch on the relay reaches the remote session.
        session.set_preset("anime")
        assert wait_for(lambda: stream(session, clip(4)) is not None
                        and remote_sessions(remote)[0].params.prompt == remote_presets["anime"].prompt, 20)
        status = client.status()
        [local] = status.sessions
        assert local.frames_in > 0 and local.frames_out > 0
    finally:
        session.close()
    assert wait_for(lambda: not remote_sessions(remote), 10)


def test_a_remote_preset_with_a_lora_runs_with_it_through_the_relay(relay, remote, wait_for):
    """The LoRA file lives on the GPU box: the relay switches the remote session to the preset by name, so the
    remote daemon applies its own preset, LoRA included, at open and on a live switch."""
    client = relay.wait_ready()
    session = client.open_session(width=W, height=H, fps=20, pixel_format="bgr24", preset="inked", params={"seed": 5})
    try:
        assert wait_for(lambda: stream(session, clip(4)) is not None
                        and remote_sessions(remote)[0].preset == "inked", 20), relay.log()
        [mirrored] = remote_sessions(remote)
        assert mirrored.params.prompt == "an ink drawing" and mirrored.params.seed == 5  # the client's value kept
        assert "ink.safetensors" in remote.log()
        session.set_preset("anime")  # no LoRA there: the remote drops it
        assert wait_for(lambda: stream(session, clip(4)) is not None
                        and remote_sessions(remote)[0].preset == "anime", 20), relay.log()
        session.set_preset("inked")
        assert wait_for(lambda: stream(session, clip(4)) is not None
                        and remote_sessions(remote)[0].preset == "inked", 20), relay.log()
        assert client.status().sessions[0].preset == "inked"
    finally:
        session.close()
    assert wait_for(lambda: not remote_sessions(remote), 10)


def test_the_relay_outlives_a_remote_restart(tmp_path, daemon_factory, wait_for):
    remote = daemon_factory(token=TOKEN)
    relay = Relay(tmp_path, remote.control_address)
    try:
        client = relay.wait_ready()
        session = client.open_session(width=W, height=H, fps=20, pixel_format="bgr24")
        assert stream(session, clip(13))
        remote.stop()
        stream(session, clip(8))  # frames go nowhere meanwhile; the local session stays open
        daemon_factory(token=TOKEN, control=remote.control_address, pub=remote.pub_address)
        assert wait_for(lambda: len(stream(session, clip(9))) > 0, 40), relay.log()
        assert not session.closed
        session.close()
    finally:
        relay.stop()


def test_an_edited_remote_preset_shows_up_on_the_relay(relay, preset_dir, wait_for):
    client = relay.wait_ready()
    assert "mine" in {p.name for p in client.list_presets().presets}
    (preset_dir / "theirs.toml").write_text('prompt = "a neon sign"\nhotkey = "ctrl+9"\n')
    assert wait_for(lambda: "theirs" in {p.name for p in client.list_presets().presets}, 20), relay.log()
    theirs = next(p for p in client.list_presets().presets if p.name == "theirs")
    assert theirs.prompt == "a neon sign" and theirs.hotkey == "ctrl+9"


def test_a_wrong_remote_token_is_a_clear_failure(tmp_path, remote):
    relay = Relay(tmp_path, remote.control_address, token="not-the-token")
    try:
        relay.process.wait(60)
        assert relay.process.returncode == 1
        assert "remote daemon" in relay.log() or "token" in relay.log()
    finally:
        relay.stop()
