"""CausalWanTransformer3DModel against diffusers' WanTransformer3DModel on the same weights (tiny config, CPU fp32).

The references are built from diffusers' own modules only: ``WanTransformer3DModel.forward`` for one chunk, and the
same forward over the whole sequence with an explicit block-causal (or sink + window) attention mask injected into
``WanAttnProcessor`` for streaming. Weights are re-drawn with larger scales than diffusers' init so that attention
is sharp and every position, timestep and cached frame visibly changes the output (checked by the negative
controls).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformer3DModel
from safetensors.torch import load_file

from sdlive.daemon.model.causal_wan import (
    CausalWanAttnProcessor,
    CausalWanTransformer3DModel,
    CrossAttentionCache,
    WanCrossAttnCacheProcessor,
)
from sdlive.daemon.model.configs import DEFAULT_CACHE_POLICY, TINY, CachePolicy

H, W = 8, 8  # latent size -> 4x4 = 16 tokens per latent frame
TOKENS = (H // 2) * (W // 2)
TEXT_LEN = 12
ATOL = 1e-5


def sharpen_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter so that attention is far from uniform (diffusers' init gives near-flat logits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight")):
                p.copy_(2.0 + torch.rand(p.shape, generator=gen))
            elif p.ndim >= 2 and "scale_shift_table" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def model() -> CausalWanTransformer3DModel:
    m = CausalWanTransformer3DModel(**TINY.transformer).eval()
    sharpen_(m)
    return m


@pytest.fixture(scope="module")
def reference(model) -> WanTransformer3DModel:
    ref = WanTransformer3DModel(**TINY.transformer).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref


def latents(frames: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, frames, H, W, generator=torch.Generator().manual_seed(seed))


def text(batch: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, TEXT_LEN, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


class MaskedWanAttnProcessor(WanAttnProcessor):
    """diffusers' processor with a fixed attention mask (True = may attend) over the whole sequence."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def chunk_visibility_mask(chunk_frames: list[int], num_kv_cache: int, num_sink: int) -> torch.Tensor:
    """[1, 1, S, S] bool: a token of a chunk ending at frame e sees every token of its own chunk and of earlier
    frames that the rolling cache still holds then: all of [0, e) while e <= num_kv_cache, else the sinks
    [0, num_sink) and the newest non-sink frames [e - (num_kv_cache - num_sink), e)."""
    frame_end = []
    end = 0
    for f in chunk_frames:
        end += f
        frame_end += [end] * f
    num_frames = len(frame_end)
    visible = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    for q in range(num_frames):
        e = frame_end[q]
        for k in range(e):
            visible[q, k] = e <= num_kv_cache or k < num_sink or k >= e - (num_kv_cache - num_sink)
    mask = visible.repeat_interleave(TOKENS, 0).repeat_interleave(TOKENS, 1)
    return mask[None, None]


def masked_reference(reference, x, per_chunk_t, chunk_frames, ctx, mask) -> torch.Tensor:
    """Full-sequence diffusers forward with ``mask`` in every attn1 and one timestep per token (its chunk's)."""
    processors = [block.attn1.processor for block in reference.blocks]
    try:
        for block in reference.blocks:
            block.attn1.set_processor(MaskedWanAttnProcessor(mask))
        t = torch.cat([torch.full((f * TOKENS,), float(t)) for f, t in zip(chunk_frames, per_chunk_t, strict=True)])
        with torch.no_grad():
            return reference(x, t.expand(x.shape[0], -1), ctx).sample
    finally:
        for block, proc in zip(reference.blocks, processors, strict=True):
            block.attn1.set_processor(proc)


def stream(model, x, per_chunk_t, chunk_frames, ctx, policy: CachePolicy = DEFAULT_CACHE_POLICY) -> torch.Tensor:
    cache = model.new_kv_cache(batch_size=x.shape[0], tokens_per_frame=TOKENS, policy=policy)
    cross = model.cross_attention_cache(ctx)
    outs, start = [], 0
    for f, t in zip(chunk_frames, per_chunk_t, strict=True):
        timestep = torch.full((x.shape[0],), float(t))
        outs.append(model.forward_stream(x[:, :, start : start + f], timestep, cross, cache))
        start += f
    return torch.cat(outs, dim=2)


def test_processors_installed_and_weights_are_diffusers_names(model, reference):
    assert all(isinstance(b.attn1.processor, CausalWanAttnProcessor) for b in model.blocks)
    assert all(isinstance(b.attn2.processor, WanCrossAttnCacheProcessor) for b in model.blocks)
    assert list(model.state_dict()) == list(reference.state_dict())


def _check_loaded(loaded, reference):
    assert isinstance(loaded.blocks[1].attn1.processor, CausalWanAttnProcessor)
    for (name, a), b in zip(loaded.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x, t, ctx = latents(2), torch.tensor([600.0]), text()
    cache = loaded.new_kv_cache(batch_size=1, tokens_per_frame=TOKENS)
    out = loaded.forward_stream(x, t, loaded.cross_attention_cache(ctx), cache)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x, t, ctx).sample, atol=ATOL, rtol=0)


def test_diffusers_wan_checkpoint_file_loads_unchanged(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    loaded = CausalWanTransformer3DModel.from_config(CausalWanTransformer3DModel.load_config(tmp_path)).eval()
    loaded.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True)
    _check_loaded(loaded, reference)


@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="diffusers' from_pretrained needs accelerate"
)
def test_from_pretrained_loads_a_diffusers_wan_checkpoint(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    _check_loaded(CausalWanTransformer3DModel.from_pretrained(tmp_path).eval(), reference)


@pytest.mark.parametrize("frames", [1, 2])
def test_empty_cache_chunk_equals_diffusers_forward(model, reference, frames):
    x, ctx = latents(frames, batch=2), text(batch=2)
    t = torch.tensor([700.0, 300.0])
    cache = model.new_kv_cache(batch_size=2, tokens_per_frame=TOKENS)
    out = model.forward_stream(x, t, model.cross_attention_cache(ctx), cache)
    with torch.no_grad():
        expected = reference(x, t, ctx).sample
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
        # diffusers' forward on our subclass (processors fall back to WanAttnProcessor) is unchanged too.
        torch.testing.assert_close(model(x, t, ctx).sample, expected, atol=ATOL, rtol=0)
    assert cache.frame_position(0) == frames and cache.num_cached_frames(1) == frames


def test_streaming_chunks_equal_block_causal_full_sequence(model, reference):
    chunks, steps = [2, 1, 1, 1], [700, 500, 400, 600]  # 5 latent frames: the cache (6) never evicts
    x, ctx = latents(sum(chunks), batch=2), text(batch=2)
    out = stream(model, x, steps, chunks, ctx)
    expected = masked_reference(reference, x, steps, chunks, ctx, chunk_visibility_mask(chunks, 6, 3))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)

    # Negative controls: the comparison is sensitive to the cached context and to the mask.
    no_cache = torch.cat(
        [stream(model, x[:, :, s : s + f], [t], [f], ctx) for s, f, t in zip([0, 2, 3, 4], chunks, steps, strict=True)],
        dim=2,
    )
    assert (no_cache[:, :, 2:] - expected[:, :, 2:]).abs().max() > 1e-2
    full = masked_reference(reference, x, steps, chunks, ctx, torch.ones_like(chunk_visibility_mask(chunks, 6, 3)))
    assert (full[:, :, :4] - expected[:, :, :4]).abs().max() > 1e-2


def test_streaming_past_eviction_equals_sink_plus_window_mask(model, reference):
    chunks = [2] + [1] * 8  # 10 latent frames: frames 6.. evict the oldest non-sink frames, sinks stay
    steps = [700, 500, 400, 700, 600, 500, 650, 550, 450]
    x, ctx = latents(sum(chunks), seed=5), text()
    out = stream(model, x, steps, chunks, ctx, CachePolicy(sink_threshold=-1.0))
    expected = masked_reference(reference, x, steps, chunks, ctx, chunk_visibility_mask(chunks, 6, 3))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    # Keeping every frame (no eviction) would differ from the rolling cache.
    no_evict = masked_reference(reference, x, steps, chunks, ctx, chunk_visibility_mask(chunks, 100, 3))
    assert (no_evict[:, :, 7:] - expected[:, :, 7:]).abs().max() > 1e-2


def test_uncommitted_steps_rewrite_the_same_cache_frames(model):
    """``compat="clean"``'s rule (upstream's repeats follow its own bookkeeping: ``test_kv_cache_compat.py``)."""
    x, ctx = latents(4, seed=7), text()
    cross = model.cross_attention_cache(ctx)
    t0, t1 = torch.tensor([700.0]), torch.tensor([500.0])
    committed = model.new_kv_cache(batch_size=1, tokens_per_frame=TOKENS, compat="clean")
    model.forward_stream(x[:, :, :2], t0, cross, committed)
    repeated = model.new_kv_cache(batch_size=1, tokens_per_frame=TOKENS, compat="clean")
    model.forward_stream(x[:, :, :2], t0, cross, repeated)

    # No-batch mode: step 1 and step 2 of chunk 2 on one cache, commit after the last.
    step1 = model.forward_stream(x[:, :, 2:3], t0, cross, repeated, commit=False)
    assert repeated.frame_position(0) == 2 and repeated.num_cached_frames(0) == 2
    step2 = model.forward_stream(x[:, :, 3:4], t1, cross, repeated, commit=True)
    # The same two calls, each as if it were the only one: step 1 left no trace.
    reference_step1 = model.forward_stream(x[:, :, 2:3], t0, cross, committed.select(0), commit=True)
    reference_step2 = model.forward_stream(x[:, :, 3:4], t1, cross, committed, commit=True)
    torch.testing.assert_close(step1, reference_step1, atol=ATOL, rtol=0)
    torch.testing.assert_close(step2, reference_step2, atol=ATOL, rtol=0)
    assert repeated.frame_position(0) == 3
    nxt = latents(1, seed=8)
    torch.testing.assert_close(
        model.forward_stream(nxt, t0, cross, repeated),
        model.forward_stream(nxt, t0, cross, committed),
        atol=ATOL,
        rtol=0,
    )


def test_stream_batch_slots_equal_separate_batch1_runs(model):
    """Two slots with their own timesteps and positions (slot 1 one chunk behind slot 0) == two batch-1 runs."""
    x, ctx = latents(4, seed=11), text()
    cross = model.cross_attention_cache(ctx)
    first = model.new_kv_cache(batch_size=1, tokens_per_frame=TOKENS)
    model.forward_stream(x[:, :, :2], torch.tensor([700.0]), cross, first)

    # Stream batch: warm-up call where slot 1 holds no chunk yet (not committed), then one call with both slots.
    batch = first.repeat(2)
    a, b = x[:, :, 2:3], x[:, :, 3:4]
    model.forward_stream(torch.cat([a, torch.zeros_like(a)]), torch.tensor([700.0, 500.0]), cross, batch, [True, False])
    assert batch.frame_positions() == [3, 2]
    out = model.forward_stream(torch.cat([b, a]), torch.tensor([650.0, 500.0]), cross, batch)
    assert batch.frame_positions() == [4, 3]

    slot0 = first.select(0)
    model.forward_stream(a, torch.tensor([700.0]), cross, slot0)
    expected0 = model.forward_stream(b, torch.tensor([650.0]), cross, slot0)
    expected1 = model.forward_stream(a, torch.tensor([500.0]), cross, first.select(0))
    torch.testing.assert_close(out[:1], expected0, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1:], expected1, atol=ATOL, rtol=0)
    # The timesteps really are per sample: swapping them changes both outputs.
    swapped = model.forward_stream(a, torch.tensor([650.0]), cross, first.select(0))
    assert (swapped - expected1).abs().max() > 1e-2


def test_fused_qkv_projections_stream_the_same(model):
    fused = CausalWanTransformer3DModel(**TINY.transformer).eval()
    fused.load_state_dict(model.state_dict())
    fused.fuse_qkv_projections()
    assert fused.blocks[0].attn1.fused_projections and fused.blocks[0].attn2.fused_projections
    chunks, steps = [2, 1], [700, 500]
    x, ctx = latents(3, seed=9), text()
    torch.testing.assert_close(
        stream(fused, x, steps, chunks, ctx), stream(model, x, steps, chunks, ctx), atol=ATOL, rtol=0
    )


def test_cross_attention_cache_equals_attn2_on_embeddings(model):
    ctx = text(batch=2)
    cross = model.cross_attention_cache(ctx)
    assert isinstance(cross, CrossAttentionCache) and len(cross.key) == len(model.blocks)
    hidden = torch.randn(2, 2 * TOKENS, model.config.num_attention_heads * model.config.attention_head_dim)
    embedded = model.condition_embedder.text_embedder(ctx)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            own = cross.for_block(i)
            torch.testing.assert_close(block.attn2(hidden, own), block.attn2(hidden, embedded), atol=ATOL, rtol=0)
    # A batch-1 cache broadcasts over the batch.
    one = model.cross_attention_cache(ctx[:1])
    x, t = latents(1, batch=2), torch.tensor([700.0, 400.0])
    broadcast = model.forward_stream(x, t, one, model.new_kv_cache(batch_size=2, tokens_per_frame=TOKENS))
    repeated = CrossAttentionCache(
        key=[k.repeat(2, 1, 1, 1) for k in one.key], value=[v.repeat(2, 1, 1, 1) for v in one.value]
    )
    explicit = model.forward_stream(x, t, repeated, model.new_kv_cache(batch_size=2, tokens_per_frame=TOKENS))
    torch.testing.assert_close(broadcast, explicit, atol=0, rtol=0)


@pytest.mark.parametrize("offset", [0, 3, 49])
def test_rope_at_frame_offset_equals_diffusers_rope_slice(model, offset):
    frames = 2
    cos, sin = model.stream_rotary_emb([offset], frames, H // 2, W // 2, torch.device("cpu"))
    ref_cos, ref_sin = model.rope(torch.zeros(1, 16, offset + frames, H, W))
    ref_cos = ref_cos[:, offset * TOKENS :, :, 0::2].float()  # diffusers repeats each pair's angle twice
    ref_sin = ref_sin[:, offset * TOKENS :, :, 1::2].float()
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)
    per_slot, _ = model.stream_rotary_emb([offset, offset + 1], frames, H // 2, W // 2, torch.device("cpu"))
    assert per_slot.shape[0] == 2 and torch.equal(per_slot[:1], cos)


def test_head_dim_128_rope_split_matches_diffusers():
    """Wan2.1's head_dim 128 splits RoPE 44/42/42 (t/h/w); one small block is enough to check it end to end."""
    config = {**TINY.transformer, "num_attention_heads": 1, "attention_head_dim": 128, "num_layers": 1}
    ours = CausalWanTransformer3DModel(**config).eval()
    sharpen_(ours, seed=3)
    ref = WanTransformer3DModel(**config).eval()
    ref.load_state_dict(ours.state_dict())
    assert (ours.rope.t_dim, ours.rope.h_dim, ours.rope.w_dim) == (44, 42, 42)
    chunks, steps = [2, 1, 1], [700, 500, 400]
    x, ctx = latents(4, seed=4), text()
    expected = masked_reference(ref, x, steps, chunks, ctx, chunk_visibility_mask(chunks, 6, 3))
    torch.testing.assert_close(stream(ours, x, steps, chunks, ctx), expected, atol=ATOL, rtol=0)


def test_rope_refresh_reuses_position_num_kv_cache_minus_one(model):
    x, ctx = latents(1, seed=3), text()
    cross, t = model.cross_attention_cache(ctx), torch.tensor([500.0])
    cache = model.new_kv_cache(batch_size=1, tokens_per_frame=TOKENS, policy=CachePolicy(rope_refresh_frames=8))
    model.forward_stream(latents(2), t, cross, cache)
    for _ in range(6):
        model.forward_stream(x, t, cross, cache)
    assert cache.frame_position(0) == 5  # 8 reached -> num_kv_cache - 1


def test_bfloat16_model_streams_with_bf16_cache_and_float32_output(model):
    bf16 = CausalWanTransformer3DModel(**TINY.transformer).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16)
    chunks, steps = [2, 1], [700, 500]
    x, ctx = latents(3), text()
    cache = bf16.new_kv_cache(batch_size=1, tokens_per_frame=TOKENS)
    assert cache.dtype == torch.bfloat16
    cross = bf16.cross_attention_cache(ctx)
    assert cross.dtype == torch.bfloat16
    out = [bf16.forward_stream(x[:, :, :2], torch.tensor([700.0]), cross, cache)]
    out.append(bf16.forward_stream(x[:, :, 2:], torch.tensor([500.0]), cross, cache))
    out = torch.cat(out, dim=2)
    assert out.dtype == torch.float32
    expected = stream(model, x, steps, chunks, ctx)
    assert (out - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bfloat16_on_cuda_matches_float32(model):
    cuda = CausalWanTransformer3DModel(**TINY.transformer).eval()
    cuda.load_state_dict(model.state_dict())
    cuda.to("cuda", torch.bfloat16)
    x, ctx = latents(2), text()
    cache = cuda.new_kv_cache(batch_size=1, tokens_per_frame=TOKENS)
    out = cuda.forward_stream(
        x.cuda(), torch.tensor([700.0], device="cuda"), cuda.cross_attention_cache(ctx.cuda()), cache
    )
    expected = stream(model, x, [700], [2], ctx)
    assert out.dtype == torch.float32 and cache.key[0].dtype == torch.bfloat16
    assert (out.cpu() - expected).abs().max() < 0.1 * expected.abs().max()


def test_bad_inputs_are_rejected(model):
    ctx = text()
    cross = model.cross_attention_cache(ctx)
    cache = model.new_kv_cache(batch_size=2, tokens_per_frame=TOKENS)
    with pytest.raises(ValueError, match="slots"):
        model.forward_stream(latents(1), torch.tensor([1.0]), cross, cache)
    with pytest.raises(ValueError, match="timestep"):
        model.forward_stream(latents(1, batch=2), torch.tensor([1.0, 2.0, 3.0]), cross, cache)
    with pytest.raises(ValueError, match="tokens per frame"):
        model.forward_stream(torch.zeros(2, 16, 1, 4, 4), torch.tensor([1.0, 2.0]), cross, cache)
