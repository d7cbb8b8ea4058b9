"""The light decoder (TAEHV for Wan 2.1, ``model.taehv``): taew2_1 files in madebyollin's key layout load (``.pth``
and ``.safetensors``, the stride-1 grow layer cut from a stride-2 checkpoint as TAEHV does), streaming one latent at
a time gives the whole-clip decode's frames, and the engine streams with it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdlive.daemon.engine import SessionParams, StreamEngine
from sdlive.daemon.model.errors import CheckpointError
from sdlive.daemon.model.taehv import StreamingTinyDecode, TinyWanDecoder, load_tiny_decoder


def taehv_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A TAEHV-format state dict as taew2_1.pth holds it: ``encoder.*`` and ``decoder.*``, the decoder's first grow
    layer (index 7) at stride 2 (512 output channels)."""
    torch.manual_seed(seed)
    state = {f"decoder.{k}": v.clone() for k, v in TinyWanDecoder().layers.state_dict().items()}
    state["decoder.7.conv.weight"] = torch.randn(512, 256, 1, 1) * 0.05
    state["encoder.0.weight"] = torch.randn(64, 3, 3, 3)  # the encoder half: ignored
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_taew2_1_file_loads_as_taehv_loads_it(tmp_path, suffix):
    state = taehv_state()
    path = tmp_path / f"taew2_1{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, path)
    decoder = load_tiny_decoder(path, dtype=torch.float32)
    own = decoder.layers.state_dict()
    assert torch.equal(own["7.conv.weight"], state["decoder.7.conv.weight"][-256:])  # the last frame's channels
    assert torch.equal(own["1.weight"], state["decoder.1.weight"])
    assert decoder.t_upscale == 4


def test_a_file_that_is_not_a_wan_taehv_names_the_keys(tmp_path):
    state = taehv_state()
    del state["decoder.3.conv.0.weight"]
    state["decoder.1.weight"] = torch.zeros(256, 48, 3, 3)  # taew2_2's 48 latent channels
    with pytest.raises(ValueError, match=r"missing \['3.conv.0.weight'\].*wrong shape \['1.weight'\]"):
        load_tiny_decoder(state, dtype=torch.float32)


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1], [2, 1, 2], [5]], ids=["1-by-1", "2-1-2", "all"])
def test_streaming_equals_the_whole_clip_decode(chunks):
    decoder = load_tiny_decoder(taehv_state(1), dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, sum(chunks), 6, 5, generator=g)
    whole = decoder.decode_video(latents)
    assert whole.shape == (1, 3, 4 * 5 - 3, 48, 40)
    stream = StreamingTinyDecode(decoder)
    parts, start = [], 0
    for n in chunks:
        parts.append(stream.decode(latents[:, :, start : start + n]))
        start += n
    assert parts[0].shape[2] == 4 * chunks[0] - 3  # the first latent gives 1 frame, every later one 4
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-5)
    assert stream.nbytes > 0
    stream.reset()
    torch.testing.assert_close(stream.decode(latents), whole, rtol=0, atol=1e-5)


def test_the_engine_streams_with_the_light_decoder(tmp_path):
    os.environ.setdefault("SDLIVE_PROMPT_CACHE", str(tmp_path / "prompts"))
    engine = StreamEngine.load("tiny", device="cpu", decoder="light")
    assert engine.decoder == "light" and engine.bundle.sources["light_decoder"].startswith("random")
    session = engine.open_session(width=64, height=48, params=SessionParams(prompt="a fox", steps=2))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(5 + 4 * 3)]
    out = [f for frame in frames for f in session.push(frame)] + session.flush()
    assert [f.index for f in out] == list(range(len(frames)))
    assert all(f.pixels.shape == (48, 64, 3) for f in out)
    est = engine.session_memory(width=64, height=48, steps=2, stream_batch=True)
    assert est.vae_cache == (
        sum(t.untyped_storage().nbytes() for t in session._vae._enc_feat_map if isinstance(t, torch.Tensor))
        + session._vae._light.nbytes
    )


def test_light_without_a_file_is_a_clear_error_for_a_real_model(tmp_path):
    from sdlive.daemon.model.bundle import light_decoder_for
    from sdlive.daemon.model.configs import get_model_spec

    with pytest.raises(CheckpointError, match="taew2_1.pth"):
        light_decoder_for(get_model_spec("wan2.1-1.3b"), None, tmp_path, device=torch.device("cpu"),
                          dtype=torch.float32)  # fmt: skip
    (tmp_path / "ckpts").mkdir()
    torch.save(taehv_state(), tmp_path / "ckpts" / "taew2_1.pth")  # upstream's tree keeps it in ckpts/
    decoder, source = light_decoder_for(get_model_spec("wan2.1-1.3b"), None, tmp_path, device=torch.device("cpu"),
                                        dtype=torch.float32)  # fmt: skip
    assert source.endswith("ckpts/taew2_1.pth") and isinstance(decoder, TinyWanDecoder)
    with pytest.raises(ValueError, match="decoder must be one of"):
        StreamEngine.load("tiny", device="cpu", decoder="tiny")  # type: ignore[arg-type]


def test_the_daemon_config_selects_the_light_decoder(tmp_path):
    from sdlive.daemon.config import load_config
    from sdlive.daemon.server.serve import load_engine

    os.environ.setdefault("SDLIVE_PROMPT_CACHE", str(tmp_path / "prompts"))
    config = load_config(None, model="tiny", device="cpu", decoder="light", warmup=False)
    assert load_engine(config, None).decoder == "light"
