"""The shipped ``mini`` model: its weights load through the normal engine path, its prompt table refuses unknown
prompts by listing the known ones, its styles differ and follow their targets on a held-out frame, and the training
forward (``tools/train_mini.py``) is the streaming forward."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlive.daemon.engine import SessionParams, StreamEngine
from sdlive.daemon.model.configs import get_model_spec
from sdlive.daemon.model.mini import UnknownPrompt, shipped_weights_dir
from sdlive.daemon.model.mini_styles import style_names, stylize
from sdlive.daemon.presets import load_presets

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="module")
def engine() -> StreamEngine:
    return StreamEngine.load("mini", device="cpu")


def test_shipped_weights_are_in_the_package_and_small() -> None:
    folder = shipped_weights_dir(get_model_spec("mini"))
    assert folder.resolve().is_relative_to((ROOT / "daemon" / "model").resolve())
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert 0 < total <= 25 * 1024**2


def test_shipped_weights_load_through_the_engine(engine: StreamEngine) -> None:
    assert engine.model_name == "mini"
    folder = str(shipped_weights_dir(engine.spec))
    assert engine.bundle.sources["transformer"] == folder and engine.bundle.sources["vae"] == folder
    assert engine.prompt_vocabulary == style_names()
    session = engine.open_session(width=64, height=64, params=SessionParams(prompt="Cartoon ", steps=1))
    frames = np.random.default_rng(0).integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)
    out = [o for f in frames for o in session.push(f)] + session.flush()
    assert [o.index for o in out] == list(range(9))
    assert out[0].pixels.shape == (64, 64, 3)


def test_unknown_prompt_is_a_clear_error_listing_the_known_ones(engine: StreamEngine) -> None:
    with pytest.raises(UnknownPrompt) as info:
        engine.open_session(width=64, height=64, params=SessionParams(prompt="anime style, cel shading"))
    message = str(info.value)
    assert "anime style, cel shading" in message
    for prompt in style_names():
        assert repr(prompt) in message
    assert isinstance(info.value, ValueError)  # what the daemon reports as a bad request


def test_every_mini_preset_uses_a_known_prompt() -> None:
    presets = {n: p for n, p in load_presets(user=False).presets.items() if n.startswith("mini-")}
    assert len(presets) >= 6
    assert sorted(p.prompt for p in presets.values()) == sorted(style_names())


@pytest.mark.xfail(
    strict=True,
    reason="the shipped mini (800 DiT steps, 28 min) does not follow all its styles yet: on this frame the cartoon, "
    "pop-art and thermal outputs stay nearest the input and pencil sketch's nearest watercolor's target (docs/mini.md, "
    "bench/mini_quality.py); strict, so a model that passes turns this into a failure to remove the mark",
)
def test_styles_differ_and_follow_their_targets_on_a_held_out_frame(engine: StreamEngine) -> None:
    """A held-out image (never in training) through every mini preset: each output is nearer its own style's target
    than every other style's target and the input, so the styles differ from each other and follow the prompt."""
    from mini_data import held_out_crop

    image = held_out_crop("coffee", 128)
    presets = sorted((p for n, p in load_presets(user=False).presets.items() if n.startswith("mini-")),
                     key=lambda p: p.name)  # fmt: skip
    targets = {p.prompt: stylize(p.prompt, image).astype(np.float32) for p in presets}
    failures = []
    for preset in presets:
        params = SessionParams(prompt=preset.prompt, steps=preset.steps, noise_scale=preset.noise_scale, seed=0)
        session = engine.open_session(width=128, height=128, params=params)
        out = [o for _ in range(9) for o in session.push(image)] + session.flush()
        result = out[-1].pixels.astype(np.float32)
        mae = {name: float(np.abs(result - t).mean()) for name, t in targets.items()}
        mae["input"] = float(np.abs(result - image).mean())
        nearest = min(mae, key=mae.__getitem__)
        if nearest != preset.prompt:
            failures.append(f"{preset.name}: nearest is {nearest} ({mae})")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("accelerate", [False, True], ids=["stock", "accelerated"])
def test_mini_vae_streams_as_the_whole_clip(accelerate: bool) -> None:
    """mini's VAE spec (the Wan2.2-style residual, 2×2-patchified one) through the streaming VAE, chunk by chunk
    (5, 4, 4 frames in; 2, 1, 1 latents out), equals diffusers' whole-clip encode and decode (random weights)."""
    import copy

    from diffusers import AutoencoderKLWan

    from sdlive.daemon.model.vae import StreamingVAE, accelerate_wan_vae

    torch.manual_seed(0)
    reference = AutoencoderKLWan(**get_model_spec("mini").vae).eval()
    vae = accelerate_wan_vae(copy.deepcopy(reference)) if accelerate else reference
    clip = torch.rand(1, 3, 13, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    svae = StreamingVAE(vae, accelerate=False, compat="clean") if not accelerate else StreamingVAE(vae, compat="clean")
    with torch.no_grad():
        expected = reference.encode(clip).latent_dist.mode()
        z = [svae.encode(clip[:, :, a:b]) for a, b in ((0, 5), (5, 9), (9, 13))]
        assert [c.shape[2] for c in z] == [2, 1, 1]
        torch.testing.assert_close(torch.cat(z, dim=2), expected, rtol=0, atol=1e-5)
        pixels = reference.decode(expected).sample
        got = torch.cat([svae.decode(expected[:, :, i : i + 1]) for i in range(expected.shape[2])], dim=2)
    assert got.shape == clip.shape
    torch.testing.assert_close(got, pixels, rtol=0, atol=1e-4)


def test_training_forward_is_the_streaming_forward() -> None:
    """The block-causal training forward of tools/train_mini.py gives what the engine's KV-cache streaming gives
    chunk by chunk (first chunk 2 latent frames, then 1), so mini is trained on exactly what it runs."""
    import train_mini

    spec = get_model_spec("mini")
    model = train_mini.build_dit(3).eval()
    x = torch.randn(2, 16, 4, 8, 8)
    labels = torch.tensor([[700.0, 700.0, 520.0, 480.0], [400.0, 400.0, 400.0, 400.0]])
    text = torch.randn(2, spec.text_len, spec.text_dim)
    train_mini.use_training_attention(model, True)
    with torch.no_grad():
        full = train_mini.causal_forward(model, x, labels, text)
    train_mini.use_training_attention(model, False)
    for b in range(2):
        cache = model.new_kv_cache(batch_size=1, tokens_per_frame=16, policy=spec.kv_cache)
        cross = model.cross_attention_cache(text[b : b + 1])
        chunks = [model.forward_stream(x[b : b + 1, :, :2], labels[b, :1], cross, cache)]
        chunks += [model.forward_stream(x[b : b + 1, :, f : f + 1], labels[b, f : f + 1], cross, cache) for f in (2, 3)]
        torch.testing.assert_close(full[b : b + 1], torch.cat(chunks, dim=2), rtol=1e-4, atol=1e-5)
