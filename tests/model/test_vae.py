"""StreamingVAE: chunk-by-chunk encode/decode equals diffusers' whole-clip AutoencoderKLWan on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKLWan

from sdlive.daemon.model.configs import TINY
from sdlive.daemon.model.vae import StreamingVAE, accelerate_wan_vae


@pytest.fixture(scope="module")
def reference() -> AutoencoderKLWan:
    """The tiny Wan VAE with stock diffusers modules (never accelerated)."""
    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY.vae).eval()


@pytest.fixture(scope="module")
def fast_vae(reference) -> AutoencoderKLWan:
    """A copy of the reference switched to the fast CPU kernels (StreamingVAE's default)."""
    return accelerate_wan_vae(copy.deepcopy(reference))


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    """13 frames (→ 4 latents) at a non-square size, pixels in [-1, 1]."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 13, 32, 48, generator=g) * 2 - 1


def _whole_clip_encode(vae: AutoencoderKLWan, frames: torch.Tensor) -> torch.Tensor:
    """diffusers' own path: encode the clip in one call, take the posterior's mode."""
    with torch.no_grad():
        return vae.encode(frames).latent_dist.mode()


def _whole_clip_decode(vae: AutoencoderKLWan, latents_normalized: torch.Tensor) -> torch.Tensor:
    """diffusers' decode takes de-normalised latents; apply z·std+mean exactly as StreamingVAE does."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return vae.decode(latents_normalized * std + mean).sample


def _stream_encode(svae: StreamingVAE, frames: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    outs, start = [], 0
    for n in sizes:
        outs.append(svae.encode(frames[:, :, start : start + n]))
        start += n
    assert start == frames.shape[2]
    return outs


@pytest.mark.parametrize("sizes", [[5, 4, 4], [1, 4, 4, 4], [9, 4]], ids=["5-4-4", "1-4-4-4", "9-4"])
def test_streaming_encode_equals_whole_clip_stock_kernels(reference, clip, sizes):
    expected = _whole_clip_encode(reference, clip)
    svae = StreamingVAE(reference, accelerate=False)
    outs = _stream_encode(svae, clip, sizes)
    assert [o.shape[2] for o in outs] == [1 + (n - 1) // 4 if i == 0 else n // 4 for i, n in enumerate(sizes)]
    torch.testing.assert_close(torch.cat(outs, dim=2), expected, rtol=0, atol=1e-6)


def test_streaming_decode_equals_whole_clip_stock_kernels(reference):
    """``compat="clean"``: float32 latents in, as diffusers' decode takes them (the default rounds them to bf16 first:
    ``test_upstream_compat_decodes_bf16_rounded_latents``)."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 16, 4, 4, 6, generator=g)
    expected = _whole_clip_decode(reference, z)
    svae = StreamingVAE(reference, accelerate=False, compat="clean")
    outs = [svae.decode(z[:, :, i : i + 1]) for i in range(z.shape[2])]
    assert [o.shape[2] for o in outs] == [1, 4, 4, 4]
    got = torch.cat(outs, dim=2)
    assert got.shape == (1, 3, 13, 32, 48)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got.min() >= -1 and got.max() <= 1


def test_accelerated_streaming_equals_whole_clip(reference, fast_vae, clip):
    """The fast CPU kernels (oneDNN conv, fused RMS norm) stay within float32 rounding of diffusers' path (float32
    latents into the decoder: ``compat="clean"``)."""
    fast = StreamingVAE(fast_vae, normalize_latents=True, compat="clean")
    z = torch.cat(_stream_encode(fast, clip, [5, 4, 4]), dim=2)
    raw = _whole_clip_encode(reference, clip)
    mean = torch.tensor(TINY.vae["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(TINY.vae["latents_std"]).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std, rtol=0, atol=2e-6)

    expected = _whole_clip_decode(reference, z)
    got = torch.cat([fast.decode(z[:, :, i : i + 1]) for i in range(z.shape[2])], dim=2)
    # Random decoder weights amplify rounding: diffusers' own float32 decode is ~2e-5 from float64 here.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def _upstream_unnormalize(vae: AutoencoderKLWan, latent: torch.Tensor) -> torch.Tensor:
    """Upstream's own lines (wan_wrapper.stream_decode_to_pixel + WanVAE_.stream_decode at c5a0f20), channels first."""
    zs = latent.to(dtype=torch.bfloat16)
    dtype = latent.dtype
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32)
    scale = [mean.to(dtype=dtype), 1.0 / std.to(dtype=dtype)]
    return zs / scale[1].view(1, 16, 1, 1, 1) + scale[0].view(1, 16, 1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-run", "bf16-run"])
def test_upstream_compat_unnormalizes_as_upstream_bitwise(reference, dtype):
    """The default ``compat="upstream"`` rounds the decoder's input to bf16 (even in a float32 run) and computes
    z / (1/std) + mean in the latents' dtype, as upstream does: bitwise its lines; clean's float32 z·std+mean differs."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 16, 3, 4, 6, generator=g).to(dtype)
    upstream = StreamingVAE(reference, accelerate=False)
    assert upstream.compat == "upstream"
    got = upstream.unnormalize(z)
    want = _upstream_unnormalize(reference, z)
    assert got.dtype == want.dtype == dtype and torch.equal(got, want)
    clean = StreamingVAE(reference, accelerate=False, compat="clean").unnormalize(z)
    assert clean.dtype == torch.float32 and not torch.equal(got.float(), clean)


def test_upstream_compat_decodes_bf16_rounded_latents(reference, fast_vae):
    """Decoding with ``compat="upstream"``: what diffusers' whole-clip decode gives on upstream's un-normalised
    latents, and a little off the clean float32 decode of the latents as given."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 16, 4, 4, 6, generator=g)
    for vae in (reference, fast_vae):
        upstream = StreamingVAE(vae, accelerate=vae is fast_vae)
        plain = StreamingVAE(vae, accelerate=vae is fast_vae, compat="clean")
        for i in range(z.shape[2]):
            latent = z[:, :, i : i + 1]
            diff = (upstream.decode(latent) - plain.decode(latent)).abs().max().item()
            assert 0 < diff < 0.05, diff  # bf16 keeps 8 bits of mantissa: a small, non-zero change
    with torch.no_grad():
        whole = reference.decode(_upstream_unnormalize(reference, z)).sample
    upstream = StreamingVAE(reference, accelerate=False)
    got = torch.cat([upstream.decode(z[:, :, i : i + 1]) for i in range(z.shape[2])], dim=2)
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-6)


def test_compat_is_validated(reference):
    with pytest.raises(ValueError, match="'upstream', 'clean'"):
        StreamingVAE(reference, compat="bf16")  # type: ignore[arg-type]


def test_accelerated_kernels_are_as_accurate_as_stock(reference, clip):
    """Against a float64 reference, the fast kernels' error is of the same size as diffusers' float32 error."""
    ref64 = copy.deepcopy(reference).double()
    truth = _whole_clip_encode(ref64, clip.double())
    stock_err = (_whole_clip_encode(reference, clip) - truth).abs().max().item()
    fast = accelerate_wan_vae(copy.deepcopy(reference))
    fast_err = (_whole_clip_encode(fast, clip) - truth).abs().max().item()
    assert fast_err <= 3 * stock_err + 1e-7

    z = truth.float()
    with torch.no_grad():
        truth_px = ref64.decode(z.double()).sample
        stock_px_err = (reference.decode(z).sample - truth_px).abs().max().item()
        fast_px_err = (fast.decode(z).sample - truth_px).abs().max().item()
    assert fast_px_err <= 3 * stock_px_err + 1e-6


def test_accelerate_keeps_weights_and_names(reference):
    fast = accelerate_wan_vae(copy.deepcopy(reference))
    ref_sd, fast_sd = reference.state_dict(), fast.state_dict()
    assert list(ref_sd) == list(fast_sd)
    assert all(torch.equal(ref_sd[k], fast_sd[k]) for k in ref_sd)
    assert accelerate_wan_vae(fast) is fast  # idempotent


def test_encode_returns_raw_mean_by_default(reference, clip):
    """Upstream quirk: μ goes out unnormalised unless normalize_latents=True."""
    raw = StreamingVAE(reference, accelerate=False).encode(clip[:, :, :5])
    norm = StreamingVAE(reference, accelerate=False, normalize_latents=True).encode(clip[:, :, :5])
    mean = torch.tensor(TINY.vae["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(TINY.vae["latents_std"]).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(raw, _whole_clip_encode(reference, clip[:, :, :5]), rtol=0, atol=1e-6)
    torch.testing.assert_close(norm, (raw - mean) / std, rtol=1e-6, atol=1e-6)
    assert raw.dtype == torch.float32 and raw.shape == (1, 16, 2, 4, 6)


def test_reset_restarts_the_stream(fast_vae, clip):
    svae = StreamingVAE(fast_vae)
    first = svae.encode(clip[:, :, :5])
    svae.encode(clip[:, :, 5:9])
    svae.reset()
    again = svae.encode(clip[:, :, :5])
    assert again.shape[2] == 2  # a fresh stream: the lone first frame again
    torch.testing.assert_close(again, first, rtol=0, atol=0)

    d1 = svae.decode(first[:, :, :1])
    svae.decode(first[:, :, 1:])
    svae.reset()
    torch.testing.assert_close(svae.decode(first[:, :, :1]), d1, rtol=0, atol=0)
    assert d1.shape[2] == 1


def test_sessions_sharing_one_vae_do_not_mix(fast_vae, clip):
    """Feature caches belong to the StreamingVAE, not to the shared AutoencoderKLWan."""
    other = torch.flip(clip, dims=[-1])
    a, b = StreamingVAE(fast_vae), StreamingVAE(fast_vae)
    a1 = a.encode(clip[:, :, :5])
    b.encode(other[:, :, :5])  # interleaved session on the same weights
    a2 = a.encode(clip[:, :, 5:9])
    solo = StreamingVAE(fast_vae)
    expected = torch.cat([solo.encode(clip[:, :, :5]), solo.encode(clip[:, :, 5:9])], dim=2)
    torch.testing.assert_close(torch.cat([a1, a2], dim=2), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("first", "later"), [(4, None), (6, None), (5, 3), (5, 0)])
def test_wrong_chunk_sizes_are_rejected(fast_vae, first, later):
    svae = StreamingVAE(fast_vae)
    frames = torch.zeros(1, 3, 8, 16, 16)
    if later is None:
        with pytest.raises(ValueError, match="1 \\+ 4k frames"):
            svae.encode(frames[:, :, :first])
    else:
        svae.encode(frames[:, :, :first])
        with pytest.raises(ValueError, match="multiple of 4"):
            svae.encode(frames[:, :, :later])


def test_bad_latent_shapes_are_rejected(fast_vae):
    svae = StreamingVAE(fast_vae)
    with pytest.raises(ValueError, match="expected latents"):
        svae.decode(torch.zeros(1, 8, 1, 4, 4))
    with pytest.raises(ValueError, match="at least one"):
        svae.decode(torch.zeros(1, 16, 0, 4, 4))
