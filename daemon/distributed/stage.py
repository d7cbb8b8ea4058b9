"""One rank's engine in the pipeline: the blocks it owns, their KV caches, and its part of every DiT forward."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..engine.engine import StreamEngine
from ..model.causal_wan import CrossAttentionCache

if TYPE_CHECKING:
    from ..engine.session import ForwardCall, StreamSession
    from ..model.kv_cache import KVCache
    from .ring import Ring

__all__ = ["ShadowVAE", "StageEngine", "StageTimer"]

VAE_STRIDE_T = 4
VAE_STRIDE_S = 8


class ShadowVAE:
    """The VAE of a rank that is not rank 0: zeros of the shapes the real one gives, so the session code (noise
    draws, chunk bookkeeping) runs as on rank 0 while rank 0 alone encodes the real frames and decodes the output."""

    def __init__(self, z_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.z_dim, self.device, self.dtype = z_dim, device, dtype
        self.reset()

    def reset(self) -> None:
        self.frames_encoded = 0
        self.latents_decoded = 0

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = frames.shape
        latents = 1 + (t - 1) // VAE_STRIDE_T if self.frames_encoded == 0 else t // VAE_STRIDE_T
        self.frames_encoded += t
        return torch.zeros(b, self.z_dim, latents, h // VAE_STRIDE_S, w // VAE_STRIDE_S, device=self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = latents.shape
        frames = VAE_STRIDE_T * f - (VAE_STRIDE_T - 1 if self.latents_decoded == 0 else 0)
        self.latents_decoded += f
        return torch.zeros(b, 3, frames, h * VAE_STRIDE_S, w * VAE_STRIDE_S, device=self.device)


class StageTimer:
    """What rank 0 needs to rebalance: this rank's milliseconds in its blocks and outside them, per forward."""

    def __init__(self) -> None:
        self.block_ms = 0.0
        self.fixed_ms = 0.0
        self.forwards = 0

    def summary(self, blocks: int) -> tuple[float, float]:
        """(ms per block per forward, ms outside the blocks per forward)."""
        n = max(self.forwards, 1)
        return self.block_ms / n / max(blocks, 1), self.fixed_ms / n


class StageEngine(StreamEngine):
    """A ``StreamEngine`` that runs only ``layers`` of the transformer and exchanges the rest of each forward with
    its neighbours on ``ring``: rank 0 embeds, every rank runs its blocks, the last rank the head and sends the flow
    back to rank 0. Each stream-batch slot travels on its own, so with ``steps`` slots the ranks work on different
    slots at once (the pipeline). Every rank keeps the whole model's weights, so a rebalance moves only caches."""

    ring: Ring
    timer: StageTimer

    def attach(self, ring: Ring, layers: range) -> None:
        """Become ``ring.rank``'s stage, running ``layers``."""
        self.ring, self.layers, self.timer = ring, layers, StageTimer()
        self.received_prompts: OrderedDict[str, torch.Tensor] = OrderedDict()
        """Ranks other than 0: the prompt embeddings rank 0 sent (they never load a text encoder)."""

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        if self.first:
            return super().encode_prompt(prompt)
        try:
            return self.received_prompts[prompt]
        except KeyError:
            raise RuntimeError(f"rank {self.ring.rank} was not sent the embedding of prompt {prompt!r}") from None

    @property
    def first(self) -> bool:
        return self.ring.rank == 0

    @property
    def last(self) -> bool:
        return self.ring.rank == self.ring.world - 1

    def new_vae(self):
        if self.first:
            return super().new_vae()
        return ShadowVAE(self.bundle.spec.vae.get("z_dim", 16), self.device, self.dtype)

    def run_forward(self, call: ForwardCall) -> torch.Tensor:
        """This rank's part of one forward; rank 0 gets the flow, the others zeros of its shape."""
        self.lora.activate(call.lora)
        tf, ring = self.transformer, self.ring
        grid = tf.stream_grid(call.x, call.t, call.cross, call.cache)
        batch = grid[0]
        slot_grid = (1, *grid[1:])
        t = call.t.expand(batch) if call.t.ndim == 0 else call.t
        flags = [call.commit] * batch if isinstance(call.commit, bool) else list(call.commit)
        tokens, width = grid[1] * grid[2] * grid[3], tf.config["num_attention_heads"] * tf.config["attention_head_dim"]
        sends, flows = [], []
        for b in range(batch):
            with call.cache.subset(b, b + 1) as cache:
                cross = _slot_cross(call.cross, b)
                started = time.perf_counter()
                context = tf.stream_context(cache, slot_grid, self.device)
                if self.first:
                    hidden, proj, temb = tf.stream_embed(call.x[b : b + 1], t[b : b + 1], cross)
                else:
                    packed = ring.recv((tokens * width + 7 * width,), self.dtype, ring.prev_rank)
                    started = time.perf_counter()
                    hidden = packed[: tokens * width].view(1, tokens, width)
                    proj = packed[tokens * width : tokens * width + 6 * width].view(1, 6, width)
                    temb = packed[tokens * width + 6 * width :].view(1, width)
                embedded = time.perf_counter()
                hidden = tf.stream_blocks_range(hidden, cross, proj, context, self.layers)
                self.synchronize()
                blocks_done = time.perf_counter()
                if self.last:
                    flow = tf.stream_head(hidden, temb, slot_grid)
                    if self.first:
                        flows.append(flow)
                    else:
                        sends.append(ring.send(flow, 0))
                else:
                    packed = torch.cat([hidden.reshape(-1), proj.reshape(-1), temb.reshape(-1)]).to(self.dtype)
                    sends.append(ring.send(packed, ring.next_rank))
                cache.commit(flags[b])
                self.timer.block_ms += (blocks_done - embedded) * 1e3
                self.timer.fixed_ms += (embedded - started + time.perf_counter() - blocks_done) * 1e3
        self.timer.forwards += 1
        if self.first and not self.last:
            flows = [ring.recv(tuple(call.x[b : b + 1].shape), torch.float32, ring.world - 1) for b in range(batch)]
        for work in sends:
            ring.wait(work, "a neighbour")
        if self.first:
            return torch.cat(flows, dim=0)
        return torch.zeros(call.x.shape, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ rebalance

    def move_layers(self, new_ranges: list[range], sessions: Iterable[StreamSession]) -> None:
        """Take the split ``new_ranges`` (the same on every rank): every block that changes rank moves its K/V and
        bookkeeping, for every session's caches, from its old rank to its new one; then the text K/V are remade
        for the blocks each rank now runs."""
        from .partition import owners

        world = self.ring.world
        old_owner = owners(_current_ranges(self.ring, self.layers, world, self.ring.gather(self.layers)))
        new_owner = owners(new_ranges)
        sessions = list(sessions)
        for layer, (src, dst) in enumerate(zip(old_owner, new_owner, strict=True)):
            if src == dst or self.ring.rank not in (src, dst):
                continue
            for cache in _caches(sessions):
                if self.ring.rank == src:
                    self.ring.wait(self.ring.send(cache.key[layer], dst), f"rank {dst}")
                    self.ring.wait(self.ring.send(cache.value[layer], dst), f"rank {dst}")
                    self.ring.send_object(cache.layer_bookkeeping(layer), dst)
                else:
                    shape = (cache.batch_size, cache.num_kv_cache * cache.tokens_per_frame, cache.num_heads,
                             cache.head_dim)  # fmt: skip
                    key = self.ring.recv(shape, cache.dtype, src)
                    value = self.ring.recv(shape, cache.dtype, src)
                    cache.adopt_layer(layer, key, value, self.ring.recv_object(src))
            if self.ring.rank == src:
                for cache in _caches(sessions):
                    cache.release_layer(layer)
        self.layers = new_ranges[self.ring.rank]
        self.timer = StageTimer()
        for session in sessions:
            session.refresh_cross_attention()


def _slot_cross(cross: CrossAttentionCache, b: int) -> CrossAttentionCache:
    if cross.batch_size == 1:
        return cross
    return CrossAttentionCache(key=[k[b : b + 1] for k in cross.key], value=[v[b : b + 1] for v in cross.value])


def _caches(sessions: list[StreamSession]) -> list[KVCache]:
    """Every KV cache the sessions hold, in the same order on every rank."""
    return [c for s in sessions for c in s.kv_caches()]


def _current_ranges(ring: Ring, mine: range, world: int, gathered: list[range]) -> list[range]:
    if len(gathered) != world or gathered[ring.rank] != mine:
        raise RuntimeError("the ranks disagree on who runs which block")
    return gathered
