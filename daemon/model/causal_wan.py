"""Causal Wan2.1 transformer for streaming: diffusers' ``WanTransformer3DModel`` plus a rolling KV cache.

``CausalWanTransformer3DModel`` subclasses diffusers' model with the same ``__init__`` and parameter names, so Wan
weights in diffusers layout load unchanged (``from_pretrained``, ``load_state_dict``). It adds only what diffusers
lacks for StreamDiffusionV2-style streaming (DESIGN §3):

* :class:`CausalWanAttnProcessor` for every ``attn1``: RoPE at an absolute latent-frame offset (per batch slot), the
  post-RoPE keys/values written into a :class:`~sdlive.daemon.model.kv_cache.KVCache`, attention over
  [cache ∪ chunk] through ``dispatch_attention_fn``;
* :class:`WanCrossAttnCacheProcessor` for every ``attn2``: attention on a :class:`CrossAttentionCache`, the text
  K/V of every block computed once per prompt by :meth:`CausalWanTransformer3DModel.cross_attention_cache`;
* :meth:`CausalWanTransformer3DModel.forward_stream`: one chunk ``[B, 16, F, h, w]`` with per-sample timesteps
  ``[B]`` → flow prediction ``v`` (float32).

The blocks are diffusers' own ``WanTransformerBlock``: ``forward_stream`` calls block ``i`` as
``block(hidden_states, cross.for_block(i), temb, context.for_block(i))``, and the block hands the first (a
:class:`BlockCrossAttention`) to ``attn2`` as its ``encoder_hidden_states`` and the second (a
:class:`StreamAttentionContext`) to ``attn1`` as its ``rotary_emb``; the processors recognise those objects. Given
ordinary tensors instead (diffusers' own ``forward``), both processors behave exactly like ``WanAttnProcessor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanTransformer3DModel,
    WanTransformerBlock,
)

from .configs import DEFAULT_CACHE_POLICY, DEFAULT_COMPAT, CachePolicy, Compat
from .kv_cache import KVCache, PerBlockKV

__all__ = [
    "BlockCrossAttention",
    "CausalWanAttnProcessor",
    "CausalWanTransformer3DModel",
    "CrossAttentionCache",
    "StreamAttentionContext",
    "WanCrossAttnCacheProcessor",
]


@dataclass
class CrossAttentionCache(PerBlockKV):
    """Text keys/values of every block's cross-attention, computed once per prompt.

    ``key[i]`` / ``value[i]``: block ``i``'s ``attn2`` keys (after ``norm_k``) and values, ``[B, L, heads,
    head_dim]``. A batch-1 cache broadcasts over any batch.
    """

    key: list[torch.Tensor]
    value: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.key[0].shape[0]

    def for_block(self, layer: int) -> BlockCrossAttention:
        """Block ``layer``'s text keys/values."""
        return BlockCrossAttention(self.key[layer], self.value[layer])


@dataclass
class BlockCrossAttention:
    """One block's text keys/values ``[1 or B, L, heads, head_dim]``, passed through the block as its
    ``encoder_hidden_states`` (a compiled block then never indexes by block number)."""

    key: torch.Tensor
    value: torch.Tensor


@dataclass
class StreamAttentionContext:
    """What ``attn1`` needs for one streamed chunk, passed through the block as its ``rotary_emb``.

    ``freqs_cos`` / ``freqs_sin``: ``[1 or B, F * h * w, 1, head_dim / 2]`` float32 rotations at each slot's
    absolute frame positions; ``kv_cache``: the cache the chunk's keys/values go into.
    """

    freqs_cos: torch.Tensor
    freqs_sin: torch.Tensor
    kv_cache: KVCache
    layer: int = 0
    """The block this context is for (:meth:`for_block`): the one index the processors need, kept out of the
    modules so that one compiled block serves every block (``compile_repeated_blocks``)."""

    def for_block(self, layer: int) -> StreamAttentionContext:
        """This context for block ``layer``."""
        return StreamAttentionContext(self.freqs_cos, self.freqs_sin, self.kv_cache, layer)


def apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs ``(x[2i], x[2i+1])`` as diffusers' Wan does; computed in float32."""
    x1, x2 = hidden_states.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, S, heads, head_dim / 2] each
    out = torch.stack((x1 * freqs_cos - x2 * freqs_sin, x1 * freqs_sin + x2 * freqs_cos), dim=-1)
    return out.flatten(-2).type_as(hidden_states)


def _equal_runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """``(start, stop, length)`` for each run of consecutive slots with the same length."""
    runs, start = [], 0
    for b in range(1, len(lengths) + 1):
        if b == len(lengths) or lengths[b] != lengths[start]:
            runs.append((start, b, lengths[start]))
            start = b
    return runs


def _qkv_projections(attn: WanAttention, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if attn.fused_projections:
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


class _StreamProcessor:
    """What both streaming processors share: diffusers' ``WanAttnProcessor`` for ordinary tensors (it gets the
    backend settings diffusers sets on this processor), the attention call and the output projection. They hold no
    block index: what is block-specific comes with each call, so one compiled block serves all (``engine.compiled``)."""

    _attention_backend = None  # set by diffusers (set_attention_backend), as on WanAttnProcessor
    _parallel_config = None

    def __init__(self) -> None:
        self._default = WanAttnProcessor()

    def _stock(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        self._default._attention_backend = self._attention_backend
        self._default._parallel_config = self._parallel_config
        return self._default(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    def _attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, S, heads, head_dim]`` queries over ``[B, S_kv, heads, head_dim]`` keys/values, same shape out."""
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=None,
        )

    @staticmethod
    def _project_out(attn: WanAttention, hidden_states: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``[B, S, heads, head_dim]`` attention output → ``[B, S, heads * head_dim]`` through ``to_out``."""
        hidden_states = hidden_states.flatten(2, 3).type_as(like)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class CausalWanAttnProcessor(_StreamProcessor):
    """Self-attention (``attn1``) over [KV cache ∪ chunk].

    With a :class:`StreamAttentionContext` as ``rotary_emb``: q/k/v projections and RMS norms as in
    ``WanAttnProcessor``, RoPE at the slots' absolute frame positions, the post-RoPE keys and the values written
    into the cache, then attention of the chunk's queries over the cache's valid frames (which include the chunk;
    no mask inside the chunk). With anything else it is ``WanAttnProcessor``.
    """

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: StreamAttentionContext | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if not isinstance(rotary_emb, StreamAttentionContext):
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("streamed self-attention takes no encoder_hidden_states or attention_mask")

        # 1. Projections and q/k RMS norms: [B, S, heads * head_dim] -> [B, S, heads, head_dim]
        query, key, value = _qkv_projections(attn, hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        # 2. RoPE at each slot's absolute latent-frame position
        query = apply_rotary_emb(query, rotary_emb.freqs_cos, rotary_emb.freqs_sin)
        key = apply_rotary_emb(key, rotary_emb.freqs_cos, rotary_emb.freqs_sin)

        # 3-4. Write post-RoPE K/V into the cache, attend over [cache ∪ chunk]: [B, S, heads, head_dim]
        hidden_states = self._cached_attention(rotary_emb, query, key, value)

        # 5. Output projection
        return self._project_out(attn, hidden_states, query)

    @torch.compiler.disable
    def _cached_attention(
        self, context: StreamAttentionContext, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """Write the chunk's K/V into the cache and attend over its valid frames. Never compiled: the cache's
        bookkeeping is Python and the window grows while the cache fills, so a compiled block runs up to here
        and from here on as two graphs that do not change from chunk to chunk."""
        key, value, lengths = context.kv_cache.write(context.layer, key, value)
        if lengths is None:
            return self._attention(query, key, value)
        # Slots hold different numbers of frames (stream-batch fill phase): one unmasked call per run of
        # slots with equal lengths, so that mask-less kernels (flash-attn, sage) serve this case too.
        runs = [self._attention(query[a:b], key[a:b, :n], value[a:b, :n]) for a, b, n in _equal_runs(lengths)]
        return torch.cat(runs, dim=0)


class WanCrossAttnCacheProcessor(_StreamProcessor):
    """Cross-attention (``attn2``) on precomputed text keys/values.

    With a :class:`BlockCrossAttention` (one block's part of a :class:`CrossAttentionCache`) as
    ``encoder_hidden_states`` only the query side runs; with a tensor it is ``WanAttnProcessor``.
    """

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: BlockCrossAttention | torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, BlockCrossAttention):
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        # 1. Query: [B, S, heads * head_dim] -> [B, S, heads, head_dim]
        batch_size = hidden_states.shape[0]
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))

        # 2. Cached text K/V: [1 or B, L, heads, head_dim]
        key = encoder_hidden_states.key
        value = encoder_hidden_states.value
        if key.shape[0] != batch_size:
            key = key.expand(batch_size, -1, -1, -1)
            value = value.expand(batch_size, -1, -1, -1)

        # 3. Attention and output projection
        return self._project_out(attn, self._attention(query, key, value, attention_mask), query)


class CausalWanTransformer3DModel(WanTransformer3DModel):
    r"""
    Wan2.1 transformer that streams chunks of latent frames through a rolling KV cache (StreamDiffusionV2).

    Same arguments and parameter names as [`WanTransformer3DModel`] (so its weights load unchanged); ``forward``
    is diffusers' full-sequence forward. Streaming goes through [`~CausalWanTransformer3DModel.new_kv_cache`],
    [`~CausalWanTransformer3DModel.cross_attention_cache`] and [`~CausalWanTransformer3DModel.forward_stream`].
    """

    _no_split_modules = ["WanTransformerBlock"]
    _keep_in_fp32_modules = ["rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
    ) -> None:
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        for block in self.stream_blocks:
            # diffusers annotates set_processor with its own processor classes; any callable processor works.
            block.attn1.set_processor(CausalWanAttnProcessor())  # type: ignore[arg-type]
            block.attn2.set_processor(WanCrossAttnCacheProcessor())  # type: ignore[arg-type]
        # float64 rotation angles per device, kept off the module so that `.to(dtype)` never rounds them.
        self._rope_angles: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def stream_blocks(self) -> Sequence[WanTransformerBlock]:
        """``self.blocks`` as what it holds (a ``ModuleList`` is typed as holding any module)."""
        return cast(Sequence[WanTransformerBlock], self.blocks)

    # ------------------------------------------------------------------ caches

    def new_kv_cache(
        self,
        *,
        batch_size: int,
        tokens_per_frame: int,
        policy: CachePolicy = DEFAULT_CACHE_POLICY,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compat: Compat = DEFAULT_COMPAT,
        layers: range | None = None,
    ) -> KVCache:
        """An empty :class:`KVCache` for this model's blocks (default device and dtype: those of ``attn1``).

        ``compat``: when the adaptive sink check runs (``"upstream"``: on every single-frame write, the fill phase
        included, as the distilled weights were tuned with; ``"clean"``: only once the cache is full).
        ``layers``: the blocks whose K/V this cache holds (a pipeline stage's; default: all)."""
        weight = self.stream_blocks[0].attn1.to_k.weight
        return KVCache(
            num_layers=len(self.blocks),
            batch_size=batch_size,
            tokens_per_frame=tokens_per_frame,
            num_heads=self.config["num_attention_heads"],
            head_dim=self.config["attention_head_dim"],
            policy=policy,
            device=device if device is not None else weight.device,
            dtype=dtype if dtype is not None else weight.dtype,
            compat=compat,
            layers=layers,
        )

    @torch.no_grad()
    def cross_attention_cache(
        self, encoder_hidden_states: torch.Tensor, layers: range | None = None
    ) -> CrossAttentionCache:
        """Text-embed ``encoder_hidden_states`` ``[B, L, text_dim]`` once and precompute every block's attn2 K/V
        (only those of ``layers`` when given, a pipeline stage's: the others hold empty ``[B, 0, …]`` tensors)."""
        if self.condition_embedder.image_embedder is not None:
            raise NotImplementedError("image-conditioned (I2V) Wan models are not supported for streaming")
        weight = self.condition_embedder.text_embedder.linear_1.weight
        context = self.condition_embedder.text_embedder(encoder_hidden_states.to(weight.device, weight.dtype))
        keys, values = [], []
        for i, block in enumerate(self.stream_blocks):
            attn = block.attn2
            if layers is not None and i not in layers:
                empty = context.new_empty(context.shape[0], 0, attn.heads, context.shape[-1] // attn.heads)
                keys.append(empty)
                values.append(empty)
                continue
            if attn.fused_projections:
                key, value = attn.to_kv(context).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(context), attn.to_v(context)
            keys.append(attn.norm_k(key).unflatten(2, (attn.heads, -1)))
            values.append(value.unflatten(2, (attn.heads, -1)))
        return CrossAttentionCache(key=keys, value=values)

    # ------------------------------------------------------------------ RoPE

    def _rope_angle_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotation angles ``[max_seq_len, dim_k / 2]`` for time, height and width (diffusers' split of head_dim)."""
        if device not in self._rope_angles:
            rope = self.rope
            self._rope_angles[device] = (
                _angles(rope.t_dim, rope.max_seq_len, device),
                _angles(rope.h_dim, rope.max_seq_len, device),
                _angles(rope.w_dim, rope.max_seq_len, device),
            )
        return self._rope_angles[device]

    def stream_rotary_emb(
        self, frame_positions: list[int], num_frames: int, height: int, width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[1 or B, num_frames * height * width, 1, head_dim / 2]`` (float32) for patched frames starting
        at each slot's absolute frame position (one row when all slots share it)."""
        max_len = self.rope.max_seq_len
        positions = frame_positions if len(set(frame_positions)) > 1 else frame_positions[:1]
        if max(positions) + num_frames > max_len or height > max_len or width > max_len:
            raise ValueError(f"RoPE position {max(positions) + num_frames} or grid {height}x{width} exceeds {max_len}")
        angles_t, angles_h, angles_w = self._rope_angle_tables(device)
        rows = len(positions)
        # [rows, F, 1, 1, t] + [1, 1, h, 1, hd] + [1, 1, 1, w, wd] -> [rows, F, h, w, head_dim / 2]
        t = torch.stack([angles_t[p : p + num_frames] for p in positions])[:, :, None, None, :]
        h = angles_h[:height][None, None, :, None, :]
        w = angles_w[:width][None, None, None, :, :]
        shape = (rows, num_frames, height, width)
        angles = torch.cat([t.expand(*shape, -1), h.expand(*shape, -1), w.expand(*shape, -1)], dim=-1)
        angles = angles.reshape(rows, num_frames * height * width, 1, -1)
        return angles.cos().float(), angles.sin().float()

    # ------------------------------------------------------------------ streaming forward

    @torch.no_grad()
    def forward_stream(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        cross: CrossAttentionCache,
        kv_cache: KVCache,
        commit: bool | Sequence[bool] = True,
    ) -> torch.Tensor:
        """
        Predict the flow ``v`` of one chunk, attending over [KV cache ∪ chunk].

        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, in_channels, num_frames, height, width)`):
                Noisy latents of one chunk (``num_frames`` = 2 for the first chunk, 1 afterwards).
            timestep (`torch.Tensor` of shape `(batch_size,)`):
                Per-sample timesteps (stream batch: one per slot); a scalar is broadcast.
            cross (`CrossAttentionCache`):
                Text K/V from [`~CausalWanTransformer3DModel.cross_attention_cache`], batch 1 or ``batch_size``.
            kv_cache (`KVCache`):
                Self-attention cache with ``batch_size`` slots; RoPE uses each slot's absolute frame position.
            commit (`bool` or one `bool` per slot):
                ``True`` advances the slot's position and rotates its ring; ``False`` leaves the chunk in flight so
                the next call rewrites the same cache frames (no-batch mode: ``n`` steps of one chunk). One flag
                per slot leaves a slot that holds no real chunk yet (stream-batch warm-up) uncommitted.

        Returns:
            `torch.Tensor` of shape `(batch_size, out_channels, num_frames, height, width)`, float32.

        Runs without autograd (the cache is written in place). Host syncs: none, except the adaptive sink refresh
        decision (one small read per block; ``compat="upstream"``: on every call, as upstream; ``"clean"``: once
        per chunk, in the cache's full phase only; see ``KVCache``).
        """
        grid = self.stream_grid(hidden_states, timestep, cross, kv_cache)
        context = self.stream_context(kv_cache, grid, hidden_states.device)
        hidden, timestep_proj, temb = self.stream_embed(hidden_states, timestep, cross)
        hidden = self.stream_blocks_range(hidden, cross, timestep_proj, context, range(len(self.blocks)))
        output = self.stream_head(hidden, temb, grid)
        # End the chunk in the cache (advance positions, rotate rings) where committed
        kv_cache.commit(commit)
        return output

    # The stages of ``forward_stream``, public so that a pipeline over several devices (``sdlive.daemon.distributed``)
    # runs the same code: each rank the blocks it owns, the first the embedding, the last the head.

    def stream_grid(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, cross: CrossAttentionCache, kv_cache: KVCache
    ) -> tuple[int, int, int, int]:
        """Check a chunk against its caches; its ``(batch, frames, height, width)`` after patching."""
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config["patch_size"]
        post_patch_height, post_patch_width = height // p_h, width // p_w
        if kv_cache.batch_size != batch_size:
            raise ValueError(f"KV cache has {kv_cache.batch_size} slots for a batch of {batch_size}")
        if kv_cache.tokens_per_frame != post_patch_height * post_patch_width:
            raise ValueError(
                f"KV cache holds {kv_cache.tokens_per_frame} tokens per frame, the latents give "
                f"{post_patch_height * post_patch_width} ({height}x{width} latent, patch {p_h}x{p_w})"
            )
        if cross.batch_size not in (1, batch_size):
            raise ValueError(f"cross-attention cache batch {cross.batch_size} is neither 1 nor {batch_size}")
        if timestep.ndim != 0 and timestep.shape != (batch_size,):
            raise ValueError(f"timestep must have shape ({batch_size},), got {tuple(timestep.shape)}")
        return batch_size, num_frames // p_t, post_patch_height, post_patch_width

    def stream_context(
        self, kv_cache: KVCache, grid: tuple[int, int, int, int], device: torch.device
    ) -> StreamAttentionContext:
        """RoPE at each slot's absolute frame position (``[1 or B, F*h*w, 1, head_dim / 2]``) and the cache."""
        _, frames, height, width = grid
        freqs_cos, freqs_sin = self.stream_rotary_emb(kv_cache.frame_positions(), frames, height, width, device)
        return StreamAttentionContext(freqs_cos=freqs_cos, freqs_sin=freqs_sin, kv_cache=kv_cache)

    def stream_embed(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, cross: CrossAttentionCache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch and time embedding: tokens ``[B, F*h*w, inner_dim]``, ``timestep_proj`` ``[B, 6, inner_dim]`` and
        ``temb`` ``[B, inner_dim]`` (both in the cross-attention cache's dtype)."""
        batch_size = hidden_states.shape[0]
        if timestep.ndim == 0:
            timestep = timestep.expand(batch_size)
        # Patch embedding: [B, C, F, H, W] -> [B, F*h*w, inner_dim]
        hidden_states = hidden_states.to(self.patch_embedding.weight.dtype)
        hidden_states = self.patch_embedding(hidden_states)
        hidden_states = hidden_states.flatten(2).transpose(1, 2).contiguous()
        # Per-sample time embedding: temb [B, inner_dim], timestep_proj [B, 6, inner_dim]
        embedder = self.condition_embedder
        timestep = embedder.timesteps_proj(timestep.to(hidden_states.device))
        time_embedder_dtype = next(iter(embedder.time_embedder.parameters())).dtype
        if timestep.dtype != time_embedder_dtype and time_embedder_dtype != torch.int8:
            timestep = timestep.to(time_embedder_dtype)
        temb = embedder.time_embedder(timestep).type_as(cross.key[0])
        timestep_proj = embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))
        return hidden_states, timestep_proj, temb

    def stream_blocks_range(
        self,
        hidden_states: torch.Tensor,
        cross: CrossAttentionCache,
        timestep_proj: torch.Tensor,
        context: StreamAttentionContext,
        layers: range,
    ) -> torch.Tensor:
        """Blocks ``layers`` (diffusers' own; the processors read ``cross`` and ``context``) on the tokens."""
        for i in layers:
            block = self.stream_blocks[i]
            hidden_states = block(hidden_states, cross.for_block(i), timestep_proj, context.for_block(i))
        return hidden_states

    def stream_head(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int, int]
    ) -> torch.Tensor:
        """Output norm, projection and unpatchify: ``[B, F*h*w, inner_dim]`` → ``[B, C_out, F, H, W]`` float32."""
        batch_size, frames, height, width = grid
        p_t, p_h, p_w = self.config["patch_size"]
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, frames, height, width, p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3).float()


def _angles(dim: int, max_seq_len: int, device: torch.device) -> torch.Tensor:
    """Angles ``pos * 10000**(-2i/dim)`` ``[max_seq_len, dim / 2]`` in float64: the frequencies of diffusers'
    ``WanRotaryPosEmbed`` (``get_1d_rotary_pos_embed``, theta 10000), one per interleaved channel pair."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    positions = torch.arange(max_seq_len, dtype=torch.float64)
    return torch.outer(positions, inv_freq).to(device)
