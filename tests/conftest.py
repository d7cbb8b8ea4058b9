"""Shared fixtures. ``daemon``: a REAL `sdlive serve --model tiny --device cpu --no-ui` process on free loopback ports.

Usage::

    def test_something(daemon):
        with DaemonClient(daemon.control_address) as client: ...

``daemon`` is module-scoped (a tiny-model start costs a few seconds): tests in one module share it, so each test
opens and closes its own sessions. ``start_daemon(...)`` starts one with other flags (a token, a short heartbeat
timeout …); ``daemon_factory`` does the same with teardown handled.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# One local secret per test session (daemons with local auth, on by default, create it; clients read it): no test
# reads or writes the real user's runtime dir. Set at import so every daemon child and client inherits it.
_SECRET_DIR = tempfile.mkdtemp(prefix="sdlive-tests-secret-")  # 0700
os.environ["SDLIVE_SECRET_FILE"] = os.path.join(_SECRET_DIR, "sdlive", "secret")
atexit.register(shutil.rmtree, _SECRET_DIR, ignore_errors=True)


def _make_session_secret() -> None:
    """Made now, as a daemon that ran before would have left it: a raw socket opened before the first daemon of the
    session starts (``wait=False``) already holds the secret that daemon keeps."""
    from sdlive.daemon.protocol.secret import ensure_local_secret

    ensure_local_secret()


_make_session_secret()

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
CLIENT_TIMEOUT_S = 30.0
"""Requests wait for the compute loop between model steps; on a CPU shared with other jobs a step can take seconds."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DaemonProcess:
    """A running daemon process started by the test suite."""

    control_address: str
    pub_address: str
    process: subprocess.Popen
    log_path: Path
    token: str | None = None
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def client(self, **kwargs):
        from sdlive.obs_bridge.client import DaemonClient

        kwargs.setdefault("token", self.token)
        kwargs.setdefault("timeout_s", CLIENT_TIMEOUT_S)
        return DaemonClient(self.control_address, **kwargs)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def daemon_command(*args: str) -> list[str]:
    """`sdlive …` through the interpreter running the tests (no dependence on PATH)."""
    return [sys.executable, "-c", "from sdlive.obs_bridge.cli import main; main()", *args]


def start_daemon(
    workdir: Path,
    *extra_args: str,
    token: str | None = None,
    control: str | None = None,
    pub: str | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
    timeout_s: float = START_TIMEOUT_S,
) -> DaemonProcess:
    """Start `sdlive serve --model tiny --device cpu --no-ui` on free loopback ports; with ``wait`` return once it
    answers ``hello`` (raise with its log if it exits or stays silent)."""
    workdir.mkdir(parents=True, exist_ok=True)
    control = control or f"tcp://127.0.0.1:{free_port()}"
    pub = pub or f"tcp://127.0.0.1:{free_port()}"
    args = ["serve", "--model", "tiny", "--device", "cpu", "--no-ui", "--control", control, "--pub", pub]
    if token is not None:
        args += ["--token", token]
    args += list(extra_args)
    log_path = workdir / f"daemon-{control.rsplit(':', 1)[1]}.log"
    child_env = dict(os.environ)
    # No user config or user presets of the machine running the tests.
    child_env.setdefault("XDG_CONFIG_HOME", str(workdir / "config"))
    child_env.pop("SDLIVE_CONFIG", None)
    child_env.pop("SDLIVE_TOKEN", None)
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env.update(env or {})
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            daemon_command(*args), stdout=log_file, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
        )
    proc = DaemonProcess(control, pub, process, log_path, token, args)
    if wait:
        _wait_ready(proc, timeout_s)
    return proc


def _wait_ready(proc: DaemonProcess, timeout_s: float) -> None:
    from sdlive.obs_bridge.client import DaemonClient, DaemonUnavailable

    deadline = time.monotonic() + timeout_s
    with DaemonClient(proc.control_address, token=proc.token, timeout_s=1.0) as client:
        while True:
            if proc.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.process.returncode} while starting:\n{proc.log()}")
            try:
                if client.hello().state != "loading":  # a loading daemon answers at once, with its progress
                    return
                time.sleep(0.1)
            except DaemonUnavailable:
                pass
            if time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError(f"daemon was not ready within {timeout_s:g} s:\n{proc.log()}") from None


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A real tiny-model daemon on CPU, shared by the tests of one module."""
    proc = start_daemon(tmp_path_factory.mktemp("daemon"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator:
    """``daemon_factory(*extra_args, token=…, wait=…)`` starts daemons that are stopped after the test."""
    started: list[DaemonProcess] = []

    def factory(*extra_args: str, **kwargs) -> DaemonProcess:
        proc = start_daemon(tmp_path / f"d{len(started)}", *extra_args, **kwargs)
        started.append(proc)
        return proc

    try:
        yield factory
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(scope="session")
def launch_daemon():
    """The ``start_daemon`` function, for module-scoped fixtures that need other flags (test files cannot import
    conftest under ``--import-mode=importlib``). The caller stops what it starts."""
    return start_daemon


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds or ``timeout_s`` passed; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@pytest.fixture(scope="session")
def wait_for():
    """``wait_for(predicate, timeout_s)``: wait on a condition, never a fixed sleep; e.g. a queued ``set_preset`` /
    ``set_params`` (answered ``pending: true`` on receipt) until ``status`` shows it live."""
    return wait_until


def _write_tiny_lora(path: Path, dim: int | None = None) -> None:
    """A LoRA on tiny's self-attention queries, in the layout community Wan LoRAs use (``dim``: another model's
    width, for a LoRA that does not fit)."""
    import torch
    from safetensors.torch import save_file

    from sdlive.daemon.model.configs import TINY

    dim = dim or TINY.transformer["num_attention_heads"] * TINY.transformer["attention_head_dim"]
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(TINY.transformer["num_layers"]):
        name = f"diffusion_model.blocks.{i}.self_attn.q"
        state[f"{name}.lora_A.weight"] = torch.randn(4, dim, generator=g) * 0.5
        state[f"{name}.lora_B.weight"] = torch.randn(dim, 4, generator=g) * 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)


@pytest.fixture(scope="session")
def write_tiny_lora():
    """``write_tiny_lora(path, dim=None)``: writes a LoRA file for the tiny model (test files cannot import each
    other under ``--import-mode=importlib``)."""
    return _write_tiny_lora


@pytest.fixture(scope="session")
def sdlive_command():
    """``sdlive_command(*args)``: the argv that runs `sdlive ARGS` with the test interpreter."""
    return daemon_command
