"""The memory estimate (``model.memory``): counted on the meta device through the real code paths, it equals the
bytes the real tensors take (tiny model on CPU), gives the known 1.3B figures, and ``open_session`` refuses a
session that would not fit with a message naming what would."""

from __future__ import annotations

import os

import pytest
import torch

from sdlive.daemon.engine import InsufficientMemory, SessionParams, StreamEngine
from sdlive.daemon.model.configs import TINY, get_model_spec
from sdlive.daemon.model.memory import GiB, estimate, max_sessions, model_memory, session_memory, table

W, H = 64, 48


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> StreamEngine:
    os.environ.setdefault("SDLIVE_PROMPT_CACHE", str(tmp_path_factory.mktemp("prompts")))
    return StreamEngine.load("tiny", device="cpu")


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor))


@pytest.mark.parametrize(("steps", "stream_batch"), [(1, True), (2, True), (3, True), (2, False)])
def test_session_estimate_equals_the_real_tensors(engine, steps, stream_batch):
    est = session_memory(TINY, width=W, height=H, steps=steps, stream_batch=stream_batch, dtype=torch.float32)
    slots = steps if stream_batch and steps > 1 else 1
    kv = engine.new_kv_cache(batch_size=slots, tokens_per_frame=(H // 16) * (W // 16))
    assert est.kv_cache == kv.nbytes
    assert est.kv_transient == (kv.nbytes // slots if slots > 1 else 0)
    cross = engine.transformer.cross_attention_cache(engine.encode_prompt("a fox"))
    assert est.cross_cache == cross.nbytes
    vae = engine.new_vae()
    with torch.inference_mode():
        vae.decode(vae.encode(torch.zeros(1, 3, 5, H, W))[:, :, :1])
        vae.decode(vae.encode(torch.zeros(1, 3, 4, H, W)))
    assert est.vae_cache == _storage_bytes([*vae._enc_feat_map, *vae._dec_feat_map]) > 0
    assert est.activations > 0 and est.peak > est.steady


def test_model_estimate_equals_the_loaded_weights(engine):
    est = model_memory(TINY, torch.float32)
    assert est.transformer == sum(p.numel() * p.element_size() for p in engine.transformer.parameters())
    assert est.vae == sum(p.numel() * p.element_size() for p in engine.bundle.vae.parameters())


def test_the_13b_figures():
    """Wan2.1 1.3B in bf16 at 480×832 (DESIGN §3): DiT 1.42 B parameters (2.84 GB), a KV cache slot of
    30 blocks × 6·1560 tokens × 1536 × K and V × 2 bytes (1.73 GB), UMT5-XXL's encoder 5.7 B parameters (11.4 GB)."""
    spec = get_model_spec("wan2.1-1.3b")
    weights = model_memory(spec)
    assert 2.80e9 < weights.transformer < 2.88e9
    assert 11.2e9 < weights.text_encoder < 11.5e9
    one = session_memory(spec, width=832, height=480, steps=1)
    two = session_memory(spec, width=832, height=480, steps=2)
    assert one.kv_cache == 30 * 6 * 1560 * 1536 * 2 * 2
    assert two.kv_cache == 2 * one.kv_cache and two.kv_transient == one.kv_cache
    assert session_memory(spec, width=832, height=480, steps=2, stream_batch=False).kv_cache == one.kv_cache
    # 2 steps, stream batch, one session: within the 20 GB target (the text encoder is not resident).
    assert estimate(spec, width=832, height=480, steps=2).total < 20e9
    assert max_sessions(spec, 24 * GiB, width=832, height=480, steps=2) >= 2
    assert max_sessions(spec, 4 * GiB, width=832, height=480, steps=2) == 0


def test_the_gpus_table_has_every_tier():
    text = table(("wan2.1-1.3b",))
    assert "| wan2.1-1.3b | 480×832 | 2 | stream batch |" in text and "12 GB" in text


def test_open_session_refuses_what_would_not_fit_and_names_what_would(engine, monkeypatch):
    params = SessionParams(prompt="a fox", steps=2)
    need = engine.session_memory(width=W, height=H, steps=2, stream_batch=True).peak
    smaller = engine.session_memory(width=W, height=H, steps=2, stream_batch=False).peak
    assert smaller < need
    monkeypatch.setattr(engine, "free_device_bytes", lambda: int((need + smaller) / 2 * 1.1))
    with pytest.raises(InsufficientMemory, match=r"needs ~.* GiB, .* GiB free .*would fit: no-batch mode"):
        engine.open_session(width=W, height=H, params=params)
    session = engine.open_session(width=W, height=H, params=params.model_copy(update={"stream_batch": False}))
    assert session.params.stream_batch is False
    monkeypatch.setattr(engine, "free_device_bytes", lambda: 1000)
    with pytest.raises(InsufficientMemory, match="nothing smaller fits either"):
        engine.open_session(width=W, height=H, params=params)
    monkeypatch.setattr(engine, "free_device_bytes", lambda: None)  # the CPU: not checked
    engine.open_session(width=W, height=H, params=params)
