"""`sdlive models list` / `sdlive models pull` through typer's CliRunner, offline (no network is touched)."""

from __future__ import annotations

import subprocess
import sys

import huggingface_hub.constants
import pytest
from typer.testing import CliRunner

from sdlive.obs_bridge.cli import app


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache, offline: huggingface_hub reads these at import, so patch its constants too."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps table cells to the terminal width
    return hub


def test_models_list_offline(offline_hub):
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    out = result.output
    for name in ("tiny", "wan2.1-1.3b", "wan2.1-14b"):
        assert name in out
    assert "built in" in out
    assert "20 GB" in out and "60 GB" in out
    assert "missing: jerryfeng/StreamDiffusionV2/wan_causal_dmd_v2v/model.pt" in out
    assert "sdlive models pull wan2.1-1.3b" in out


def test_models_list_shows_a_cached_generator(offline_hub):
    commit = "0" * 40
    repo = offline_hub / "models--jerryfeng--StreamDiffusionV2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    gen = repo / "snapshots" / commit / "wan_causal_dmd_v2v" / "model.pt"
    gen.parent.mkdir(parents=True)
    gen.write_bytes(b"x" * 2048)
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "wan2.1-1.3b" in line)
    assert "jerryfeng/StreamDiffusionV2/wan_causal_dmd_v2v/model.pt" not in row  # found, so not listed as missing
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae" in row


def test_models_pull_offline_is_a_clear_error(offline_hub):
    result = CliRunner().invoke(app, ["models", "pull", "wan2.1-1.3b"])
    assert result.exit_code == 1
    assert "cannot download wan2.1-1.3b" in result.output
    assert "HF_HUB_OFFLINE" in result.output
    assert "Traceback" not in result.output


def test_models_pull_unknown_name(offline_hub):
    result = CliRunner().invoke(app, ["models", "pull", "wan9"])
    assert result.exit_code == 1
    assert "unknown model 'wan9'" in result.output


def test_models_pull_tiny_needs_nothing(offline_hub):
    result = CliRunner().invoke(app, ["models", "pull", "tiny"])
    assert result.exit_code == 0
    assert "nothing to download" in result.output


def test_cli_import_does_not_import_torch():
    code = "import sys, sdlive.obs_bridge.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
