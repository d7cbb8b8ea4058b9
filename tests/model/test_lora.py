"""LoRA styles (``model.lora``): files in the diffusers/PEFT layout and in the original Wan / ComfyUI layout load as
PEFT adapters onto the transformer; a missing or mismatched file is a clear error naming it; a session switches
its LoRA live, blending the weight over ``transition_chunks`` chunks, without a reset."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdlive.daemon.engine import SessionParams, StreamEngine
from sdlive.daemon.model.configs import TINY
from sdlive.daemon.model.lora import LoraError, read_lora

DIM = TINY.transformer["num_attention_heads"] * TINY.transformer["attention_head_dim"]
FFN = TINY.transformer["ffn_dim"]


def write_lora(path, *, layout: str = "diffusers", rank: int = 4, scale: float = 0.5, seed: int = 0, dim: int = DIM):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(TINY.transformer["num_layers"]):
        for original, ours, out in (("self_attn.q", "attn1.to_q", dim), ("cross_attn.k", "attn2.to_k", dim),
                                    ("ffn.0", "ffn.net.0.proj", FFN)):  # fmt: skip
            name = f"diffusion_model.blocks.{i}.{original}" if layout == "wan" else f"transformer.blocks.{i}.{ours}"
            state[f"{name}.lora_A.weight"] = torch.randn(rank, dim, generator=g) * scale
            state[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * scale
    save_file(state, path)
    return path


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> StreamEngine:
    os.environ.setdefault("SDLIVE_PROMPT_CACHE", str(tmp_path_factory.mktemp("prompts")))
    return StreamEngine.load("tiny", device="cpu")


def clip(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return [np.roll(base, 2 * i, axis=1) for i in range(n)]


def run(session, frames) -> np.ndarray:
    out = [f for frame in frames for f in session.push(frame)]
    return np.stack([f.pixels for f in out]).astype(np.int16)


@pytest.mark.parametrize("layout", ["diffusers", "wan"])
def test_both_layouts_read_as_diffusers_keys(tmp_path, layout):
    state = read_lora(write_lora(tmp_path / f"{layout}.safetensors", layout=layout))
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in state
    assert "transformer.blocks.3.ffn.net.0.proj.lora_B.weight" in state


def test_bad_files_are_clear_errors_naming_them(tmp_path, engine):
    with pytest.raises(LoraError, match="missing.safetensors not found"):
        engine.lora.load(tmp_path / "missing.safetensors")
    (tmp_path / "style.pt").write_bytes(b"not a safetensors")
    with pytest.raises(LoraError, match=r"style.pt: only .safetensors"):
        engine.lora.load(tmp_path / "style.pt")
    wrong = write_lora(tmp_path / "big.safetensors", dim=1536)  # a 1.3B LoRA on the tiny model
    with pytest.raises(LoraError, match=r"big.safetensors does not fit this model .*1.3B vs 14B"):
        engine.lora.load(wrong)
    assert engine.lora.names == []  # nothing half-loaded


def test_a_session_switches_its_lora_live_and_blends(tmp_path, engine):
    style = write_lora(tmp_path / "style.safetensors", layout="wan")
    params = SessionParams(prompt="a fox", steps=1, seed=1, transition_chunks=3)
    frames = clip(5 + 4 * 8)
    plain = run(engine.open_session(width=64, height=48, params=params), frames)
    styled_session = engine.open_session(width=64, height=48, params=params)
    styled_session.set_lora(str(style), 1.0)  # before the first chunk: at once
    [name] = styled_session.lora_weights
    styled = run(styled_session, frames)
    assert np.abs(styled - plain).mean() > 1.0  # the LoRA changes the picture

    # Live: from no LoRA to this one over 3 chunks, then off again, the stream never reset.
    session = engine.open_session(width=64, height=48, params=params)
    run(session, frames[:9])
    session.set_lora(str(style), 0.9)
    weights = []
    for i in range(4):  # one chunk (4 frames) each
        for frame in frames[9 + i * 4 : 13 + i * 4]:
            session.push(frame)
        weights.append(round(session.lora_weights.get(name, 0.0), 6))
    assert weights == [0.3, 0.6, 0.9, 0.9] and session.chunks == 6
    session.set_lora(None)
    for frame in frames[25:29]:
        session.push(frame)
    assert session.lora_weights.get(name, 0.0) == pytest.approx(0.6)
    # A session without a LoRA is untouched by another's: the adapters' weights are set per session.
    again = run(engine.open_session(width=64, height=48, params=params), frames)
    assert np.array_equal(again, plain)


def test_weight_zero_is_the_base_model_exactly(tmp_path, engine):
    style = write_lora(tmp_path / "zero.safetensors", seed=3)
    params = SessionParams(prompt="a fox", steps=1, seed=1)
    frames = clip(5 + 4 * 3)
    base = run(engine.open_session(width=64, height=48, params=params), frames)
    session = engine.open_session(width=64, height=48, params=params)
    session.set_lora(str(style), 0.0)
    assert np.array_equal(run(session, frames), base)
    with pytest.raises(ValueError, match="lora_strength"):
        session.set_lora(str(style), 5.0)
