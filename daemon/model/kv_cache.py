"""Rolling self-attention KV cache with sink frames, as StreamDiffusionV2 runs its causal Wan DiT (DESIGN §3).

One :class:`KVCache` holds, for every transformer block, a **preallocated** key and a value tensor of shape
``[B, num_kv_cache * tokens_per_frame, heads, head_dim]``: ``num_kv_cache`` latent frames per batch slot, of which the
first ``num_sink`` are *sink* frames. Keys are stored after RoPE, so the order of frames inside the buffer does not
matter to attention (softmax attention is invariant to the order of its keys).

Life of one chunk of ``F`` latent frames (``F`` = 2 for the first chunk, 1 afterwards):

1. :meth:`KVCache.frame_positions` gives, per slot, the absolute latent-frame index of the chunk's first frame
   (the RoPE offset).
2. For every block, :meth:`KVCache.write` decides where the chunk's frames go, writes its keys/values there and
   returns the keys/values to attend over: the valid cache frames, which now include the chunk itself
   (attention over [cache ∪ chunk], no mask inside the chunk).

   * **Fill phase** (fewer than ``num_kv_cache`` frames cached): append.
   * **Full phase**: the new frame overwrites the oldest non-sink frame (round-robin over the non-sink slots);
     sink slots never rotate out, except by the **adaptive sink refresh**: when a single new frame arrives, for each
     sink frame ``j``: ``avg_j = (cos(mean K_sink_j, mean K_new) + cos(mean V_sink_j, mean V_new)) / 2`` (means over
     the frame's tokens, cosine over heads·head_dim); if ``min_j avg_j < sink_threshold`` the new frame replaces the
     least similar sink instead, and the round-robin order of the non-sink slots is left as it was.

   When the check runs depends on ``compat`` (:func:`~.configs.check_compat`):

   * ``"upstream"`` (default, = StreamDiffusionV2's ``CausalWanSelfAttention``): on **every** single-frame write,
     the fill phase included, where a sink frame not written yet counts as a zero vector (similarity 0). A sink
     chosen by the check is put at the front of a per-block, per-slot queue (upstream's ``evict_idx.insert(0, …)``);
     a single-frame write into a full cache takes the front of that queue if there is one, else the oldest non-sink
     frame. So with the defaults (6 frames, 3 sinks, threshold 0.2; chunk 0 fills frames 0–1) chunk 1 finds sink
     frame 2 empty, queues it and writes it (fill); chunks 2–4 fill frames 3–5; chunk 5, the first full-cache
     write, overwrites sink frame 2 again; chunks 6, 7, 8, 9 … then overwrite 3, 4, 5, 3 … The round robin is
     upstream's too: each fill write registers the slot one chunk ahead, so after the 2-frame first chunk slots 1
     and 2 never join it (with 3 sinks they are sinks anyway; with fewer they are never overwritten).
   * ``"clean"``: only in the full phase (a fill-phase sink is never chosen for being still empty); chunk 5 then
     overwrites frame 3.

3. :meth:`KVCache.commit` ends the chunk: the slot's frame count and position advance and the ring rotates.
   Without a commit, the next call for the same slot rewrites **the same** frame slots (no-batch mode runs the
   ``n`` denoising steps of one chunk on one cache and rotates only after the last step). Once the position reaches
   ``rope_refresh_frames`` it is reset to ``num_kv_cache - 1`` (**RoPE refresh**, upstream's ``t_refresh``).

Design choices (see also ``docs/architecture.md``):

* All bookkeeping is host ints (per slot; the ring order per block and slot). The only device→host read in the hot
  path is the sink-refresh decision, taken like upstream **per block** (inside every self-attention, on the block's
  own keys/values), **once per chunk** and slot: on the first ``write`` after a commit, with a single new frame and
  the refresh enabled (with ``compat="clean"`` only in the full phase). The decisions of all slots of a block are
  read back together (one small ``.tolist()`` per block). The decision is then remembered until the commit, so the
  uncommitted repeats of a chunk (no-batch mode) write the same slot.
  Upstream re-evaluates it at every step of such a chunk; that we do not reproduce (its first step's decision is
  the one kept, which is upstream's whenever the later steps' checks do not trigger).
* A threshold of ``-1`` (or lower) turns the refresh off (a cosine is never below −1, and the check is skipped).
* Slots may sit at different positions and frame counts (stream batch: slot ``i`` is one chunk behind slot
  ``i − 1``); ``write`` then reports each slot's valid length and attention runs per group of equal lengths (no
  mask, so every attention backend works, flash-attn included). ``commit`` takes one flag per slot, and
  :meth:`KVCache.subset` runs part of the slots on shared storage, so a slot holding no real chunk yet
  (stream-batch warm-up) is never written or advanced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .configs import DEFAULT_CACHE_POLICY, DEFAULT_COMPAT, CachePolicy, Compat, check_compat, check_compat_policy

__all__ = ["CacheWindow", "CachePolicy", "KVCache", "PerBlockKV"]


class PerBlockKV:
    """Key and value tensors per transformer block, ``key[i]`` / ``value[i]`` (a self- or cross-attention cache)."""

    key: list[torch.Tensor]
    value: list[torch.Tensor]

    @property
    def dtype(self) -> torch.dtype:
        return self.key[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the K and V tensors of all blocks."""
        return sum(t.numel() * t.element_size() for t in (*self.key, *self.value))


class CacheWindow(NamedTuple):
    """What a chunk attends to after :meth:`KVCache.write`: the valid cache frames, the chunk included."""

    key: torch.Tensor
    """``[B, S, heads, head_dim]`` post-RoPE keys."""
    value: torch.Tensor
    """``[B, S, heads, head_dim]`` values."""
    lengths: list[int] | None
    """``None`` when every slot attends over all ``S`` tokens, else each slot's number of valid leading tokens (slots
    hold different numbers of frames)."""


class KVCache(PerBlockKV):
    """Per-block rolling K/V cache of ``num_kv_cache`` latent frames (``num_sink`` of them sinks) per batch slot.

    Args:
        num_layers: transformer blocks (one K and one V tensor each).
        batch_size: batch slots (stream batch: one per denoising step in flight).
        tokens_per_frame: tokens of one latent frame after patching, ``(h / 2) * (w / 2)``.
        num_heads: attention heads.
        head_dim: channels per head.
        policy: what the cache keeps: frames per slot, sinks, sink refresh threshold, RoPE refresh
            (:class:`~.configs.CachePolicy`, validated there); its fields are also attributes of the cache.
        device: where the tensors live.
        dtype: tensor dtype (the transformer's dtype: bf16 on CUDA, fp32 on CPU).
        compat: ``"upstream"`` (default): the sink check also runs in the fill phase, as upstream's does (the
            distilled weights were tuned with it); ``"clean"``: only once the cache is full (module docstring).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        policy: CachePolicy = DEFAULT_CACHE_POLICY,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compat: Compat = DEFAULT_COMPAT,
    ) -> None:
        if num_layers < 1 or batch_size < 1 or tokens_per_frame < 1 or num_heads < 1 or head_dim < 1:
            raise ValueError(
                "num_layers, batch_size, tokens_per_frame, num_heads and head_dim must be positive, got "
                f"{num_layers}, {batch_size}, {tokens_per_frame}, {num_heads}, {head_dim}"
            )
        self.policy = policy
        self.compat: Compat = check_compat(compat)
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.tokens_per_frame = tokens_per_frame
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_cache = policy.num_kv_cache
        self.num_sink = policy.num_sink
        self.sink_threshold = float(policy.sink_threshold)
        self.rope_refresh_frames = policy.rope_refresh_frames

        shape = (batch_size, self.num_kv_cache * tokens_per_frame, num_heads, head_dim)
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.key: list[torch.Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        """Per block: post-RoPE keys ``[B, num_kv_cache * tokens_per_frame, heads, head_dim]``."""
        self.value: list[torch.Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        """Per block: values, same shape as :attr:`key`."""
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget every cached frame; positions restart at 0. The tensors are kept (stale data is never read)."""
        self._num_frames: list[int] = [0] * self.batch_size
        self._position: list[int] = [0] * self.batch_size
        # Non-sink frame slots per block and batch slot, oldest first: the round-robin eviction order.
        self._ring: list[list[list[int]]] = [[[] for _ in range(self.batch_size)] for _ in range(self.num_layers)]
        # Frame slots chosen for the uncommitted chunk, per block and batch slot (None: nothing in flight).
        self._pending: list[list[list[int] | None]] = [[None] * self.batch_size for _ in range(self.num_layers)]
        self._pending_frames: list[int | None] = [None] * self.batch_size
        # compat="upstream": sink frames the sink check chose, not overwritten yet (front first), per block and slot;
        # and that queue as the uncommitted chunk leaves it (None: unchanged).
        self._sink_queue: list[list[list[int]]] = [[[] for _ in range(self.batch_size)] for _ in range(self.num_layers)]
        self._pending_queue: list[list[list[int] | None]] = [[None] * self.batch_size for _ in range(self.num_layers)]

    @property
    def device(self) -> torch.device:
        return self.key[0].device

    def frame_position(self, b: int) -> int:
        """Absolute latent-frame index (RoPE offset) of the next chunk of slot ``b``."""
        return self._position[b]

    def frame_positions(self) -> list[int]:
        """:meth:`frame_position` of every slot."""
        return list(self._position)

    def num_cached_frames(self, b: int) -> int:
        """Committed frames held by slot ``b`` (at most ``num_kv_cache``)."""
        return self._num_frames[b]

    def ring_order(self, layer: int, b: int) -> list[int]:
        """Non-sink frame slots of block ``layer``, slot ``b``, oldest first (the next one overwritten first).

        With ``compat="upstream"`` the fill phase registers each slot one chunk ahead, as upstream does (so it may
        name a slot not written yet, and frame slots 1 and 2 are never in it)."""
        return list(self._ring[layer][b])

    def sink_queue(self, layer: int, b: int) -> list[int]:
        """Sink frame slots of block ``layer``, slot ``b`` that the sink check chose and that are still to be
        overwritten, the next first (``compat="upstream"``: fill-phase choices wait for the cache to be full;
        always empty with ``"clean"``)."""
        return list(self._sink_queue[layer][b])

    def frame_tokens(self, frame_slot: int) -> slice:
        """Token range of frame slot ``frame_slot`` inside :attr:`key` / :attr:`value`."""
        t = self.tokens_per_frame
        return slice(frame_slot * t, (frame_slot + 1) * t)

    # ------------------------------------------------------------------ copies

    def _copy_with(self, key: list[torch.Tensor], value: list[torch.Tensor], slots: Sequence[int]) -> KVCache:
        new = object.__new__(KVCache)
        new.__dict__.update(self.__dict__)
        new.batch_size = len(slots)
        new.key, new.value = key, value
        new._num_frames = [self._num_frames[i] for i in slots]
        new._position = [self._position[i] for i in slots]
        new._ring = [[list(ring[i]) for i in slots] for ring in self._ring]
        new._pending = [[None] * len(slots) for _ in range(self.num_layers)]
        new._pending_frames = [None] * len(slots)
        new._sink_queue = [[list(queue[i]) for i in slots] for queue in self._sink_queue]
        new._pending_queue = [[None] * len(slots) for _ in range(self.num_layers)]
        return new

    def _check_no_pending(self, what: str) -> None:
        if any(p is not None for p in self._pending_frames):
            raise RuntimeError(f"cannot {what} a KVCache with an uncommitted chunk: call commit() first")

    def repeat(self, n: int) -> KVCache:
        """A new cache of ``n`` slots, each a copy of this batch-1 cache (one per stream-batch slot)."""
        if self.batch_size != 1:
            raise ValueError(f"repeat() needs a batch-1 cache, this one has {self.batch_size} slots")
        if n < 1:
            raise ValueError(f"repeat count must be >= 1, got {n}")
        self._check_no_pending("repeat")
        key = [k.repeat(n, 1, 1, 1) for k in self.key]
        value = [v.repeat(n, 1, 1, 1) for v in self.value]
        return self._copy_with(key, value, [0] * n)

    def select(self, i: int) -> KVCache:
        """A new batch-1 cache holding a copy of slot ``i`` (no-batch mode)."""
        if not 0 <= i < self.batch_size:
            raise IndexError(f"slot {i} out of range for a cache of {self.batch_size} slots")
        self._check_no_pending("select from")
        key = [k[i : i + 1].clone() for k in self.key]
        value = [v[i : i + 1].clone() for v in self.value]
        return self._copy_with(key, value, [i])

    @contextmanager
    def subset(self, start: int, stop: int) -> Iterator[KVCache]:
        """Slots ``[start, stop)`` as a cache of their own that shares this cache's tensors.

        Writes land in this cache's storage and the bookkeeping (frame counts, positions, ring order, a chunk in
        flight) is copied back on exit. The stream batch runs the pipeline's filling calls (fewer chunks than slots)
        and its drain (one slot at a time) this way, without copying a tensor and without writing anything into
        the slots that hold no chunk.
        """
        if not 0 <= start < stop <= self.batch_size:
            raise IndexError(f"slots [{start}, {stop}) out of range for a cache of {self.batch_size} slots")
        if start == 0 and stop == self.batch_size:
            yield self
            return
        slots = range(start, stop)
        view = self._copy_with([k[start:stop] for k in self.key], [v[start:stop] for v in self.value], slots)
        for j, b in enumerate(slots):
            view._pending_frames[j] = self._pending_frames[b]
            for layer in range(self.num_layers):
                view._pending[layer][j] = self._pending[layer][b]
                view._pending_queue[layer][j] = self._pending_queue[layer][b]
        try:
            yield view
        finally:
            for j, b in enumerate(slots):
                self._num_frames[b] = view._num_frames[j]
                self._position[b] = view._position[j]
                self._pending_frames[b] = view._pending_frames[j]
                for layer in range(self.num_layers):
                    self._ring[layer][b] = view._ring[layer][j]
                    self._pending[layer][b] = view._pending[layer][j]
                    self._sink_queue[layer][b] = view._sink_queue[layer][j]
                    self._pending_queue[layer][b] = view._pending_queue[layer][j]

    # ------------------------------------------------------------------ one chunk

    def _num_chunk_frames(self, num_tokens: int) -> int:
        num_frames, rest = divmod(num_tokens, self.tokens_per_frame)
        if rest or num_frames < 1:
            raise ValueError(
                f"chunk of {num_tokens} tokens is not a whole number of {self.tokens_per_frame}-token frames"
            )
        if num_frames > self.num_kv_cache - self.num_sink:
            # More frames than non-sink slots would overwrite frames of the same chunk in the full phase.
            raise ValueError(
                f"a chunk of {num_frames} latent frames does not fit the {self.num_kv_cache - self.num_sink} "
                "non-sink cache frames"
            )
        return num_frames

    def _plan(self, layer: int, b: int, num_frames: int) -> list[int]:
        """Frame slots for a new chunk of ``num_frames`` frames in slot ``b`` (without the sink refresh)."""
        cached, ring = self._num_frames[b], self._ring[layer][b]
        targets: list[int] = []
        overflow = 0
        for f in range(num_frames):
            if cached + f < self.num_kv_cache:
                targets.append(cached + f)
            else:
                # Frames appended by this same chunk join the ring's tail after the ones already there.
                candidates = ring + [s for s in targets if s >= self.num_sink]
                if overflow >= len(candidates):
                    check_compat_policy(self.compat, self.policy)  # the known case, with its own message
                    raise RuntimeError(f"no non-sink frame slot left to overwrite in {self!r}")
                targets.append(candidates[overflow])
                overflow += 1
        return targets

    def _sink_refresh(self, layer: int, slots: list[int], key: torch.Tensor, value: torch.Tensor) -> list[int]:
        """Per slot in ``slots``: the least similar sink frame if its similarity is below the threshold, else -1.

        A sink frame the slot has not written yet counts as upstream's zero-initialised one: similarity 0.
        """
        t, s = self.tokens_per_frame, self.num_sink
        index = torch.tensor(slots, device=key.device) if len(slots) != self.batch_size else None

        def mean_cos(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            sinks = cache[:, : s * t] if index is None else cache.index_select(0, index)[:, : s * t]
            new = new if index is None else new.index_select(0, index)
            sink_mean = sinks.unflatten(1, (s, t)).float().mean(2).flatten(2)  # [n, S, heads*head_dim]
            new_mean = new.float().mean(1).flatten(1)  # [n, heads*head_dim]
            return F.cosine_similarity(sink_mean, new_mean[:, None], dim=-1)  # [n, S]

        avg = (mean_cos(self.key[layer], key) + mean_cos(self.value[layer], value)) / 2
        if any(self._num_frames[b] < s for b in slots):  # fill phase: cos(0, x) = 0, whatever the stale data
            written = torch.tensor([[j < self._num_frames[b] for j in range(s)] for b in slots], device=avg.device)
            avg = torch.where(written, avg, torch.zeros_like(avg))
        # argmin: the first of equal minima, as upstream's torch.argmin over one slot's sinks.
        least_similar = avg.argmin(dim=1)
        min_sim = avg.gather(1, least_similar[:, None])[:, 0]
        choice = torch.where(min_sim < self.sink_threshold, least_similar, torch.full_like(least_similar, -1))
        # The one device->host read of the hot path: which sink (if any) each slot refreshes, for this block.
        return choice.tolist()

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> CacheWindow:
        """Store a chunk's keys/values for block ``layer`` and return what the chunk attends to.

        Args:
            layer: block index.
            key: post-RoPE keys of the chunk, ``[B, F * tokens_per_frame, heads, head_dim]``.
            value: values, same shape.

        Returns:
            :class:`CacheWindow` ``(key, value, lengths)``: ``[B, S, heads, head_dim]`` over the valid cache frames
            (the chunk included); ``lengths`` is ``None`` when every slot attends over all ``S`` tokens, else the
            number of valid leading tokens per slot (slots hold different numbers of frames).
        """
        batch_size = key.shape[0]
        if batch_size != self.batch_size:
            raise ValueError(f"chunk batch {batch_size} != KV cache batch {self.batch_size}")
        num_frames = self._num_chunk_frames(key.shape[1])
        for b, in_flight in enumerate(self._pending_frames):
            if in_flight is not None and in_flight != num_frames:
                raise ValueError(
                    f"slot {b} has an uncommitted chunk of {in_flight} frames; got one of {num_frames} frames"
                )

        # 1. Frame slots per batch slot: reuse an uncommitted decision, otherwise plan (fill / round-robin).
        pending = self._pending[layer]
        targets: list[list[int]] = []
        fresh: list[int] = []
        for b in range(batch_size):
            planned = pending[b]
            if planned is None:
                planned = pending[b] = self._plan(layer, b, num_frames)
                fresh.append(b)
            targets.append(planned)
        # 2. Adaptive sink refresh: a single new frame into a full cache may replace the least similar sink.
        if fresh and num_frames == 1 and self.num_sink > 0 and self.sink_threshold > -1.0:
            upstream = self.compat == "upstream"
            checked = [b for b in fresh if upstream or self._num_frames[b] == self.num_kv_cache]
            if checked:
                for b, sink in zip(checked, self._sink_refresh(layer, checked, key, value), strict=True):
                    if not upstream:
                        if sink >= 0:
                            pending[b] = targets[b] = [sink]
                        continue
                    # upstream: the choice joins the queue's front; a write into a full cache takes the front.
                    queue = ([sink] if sink >= 0 else []) + self._sink_queue[layer][b]
                    if queue and self._num_frames[b] == self.num_kv_cache:
                        pending[b] = targets[b] = [queue.pop(0)]
                    self._pending_queue[layer][b] = queue
        for b in range(batch_size):
            self._pending_frames[b] = num_frames

        # 3. Write the chunk: one slice copy per frame when every slot uses the same frame slots.
        cache_k, cache_v, t = self.key[layer], self.value[layer], self.tokens_per_frame
        key, value = key.to(cache_k.dtype), value.to(cache_v.dtype)
        if all(p == targets[0] for p in targets):
            for f, slot in enumerate(targets[0]):
                cache_k[:, slot * t : (slot + 1) * t] = key[:, f * t : (f + 1) * t]
                cache_v[:, slot * t : (slot + 1) * t] = value[:, f * t : (f + 1) * t]
        else:
            for b in range(batch_size):
                for f, slot in enumerate(targets[b]):
                    cache_k[b, slot * t : (slot + 1) * t] = key[b, f * t : (f + 1) * t]
                    cache_v[b, slot * t : (slot + 1) * t] = value[b, f * t : (f + 1) * t]

        # 4. Attend over the valid frames (fill phase: a prefix of the buffer).
        valid = [min(self.num_kv_cache, n + num_frames) for n in self._num_frames]
        longest = max(valid)
        lengths = None if min(valid) == longest else [v * t for v in valid]
        return CacheWindow(cache_k[:, : longest * t], cache_v[:, : longest * t], lengths)

    def commit(self, slots: bool | Sequence[bool] = True) -> None:
        """End the chunk in flight for the slots flagged True: count its frames, advance the position (with the
        RoPE refresh) and rotate the ring. Slots flagged False keep their chunk in flight: the next ``write``
        rewrites the same frame slots."""
        flags = [bool(slots)] * self.batch_size if isinstance(slots, bool) else [bool(s) for s in slots]
        if len(flags) != self.batch_size:
            raise ValueError(f"commit() got {len(flags)} flags for {self.batch_size} slots")
        for b, flag in enumerate(flags):
            num_frames = self._pending_frames[b]
            if not flag or num_frames is None:
                continue
            cached = self._num_frames[b]
            # compat="upstream", fill phase: upstream's ring (evict_idx) gets the slot *after* the chunk, as if the
            # next chunk were as long as this one (rolling_end = current_end + chunk length), if it is a non-sink
            # slot and not the ring's newest already. That skips frame slots 1 and 2 (the 2-frame first chunk's
            # second frame, the next chunk's): upstream never evicts those that are not sinks (num_sink <= 2). With
            # 3 sinks the full ring is the same as sdlive's own.
            upstream_fill = self.compat == "upstream" and cached + num_frames <= self.num_kv_cache
            registered = cached + 2 * num_frames  # the end of the slot upstream registers, in frames
            for layer in range(self.num_layers):
                targets = self._pending[layer][b]
                if targets is None:
                    raise RuntimeError(f"block {layer} never wrote the chunk of slot {b}; cannot commit")
                ring = self._ring[layer][b]
                if upstream_fill:
                    if self.num_sink < registered <= self.num_kv_cache and (not ring or ring[-1] != registered - 1):
                        ring.append(registered - 1)
                else:
                    for slot in targets:
                        if slot < self.num_sink:
                            continue  # fill of a sink frame, or a sink refresh: the ring is unchanged
                        if slot in ring:
                            ring.remove(slot)  # overwritten: it becomes the newest non-sink frame
                        ring.append(slot)
                self._pending[layer][b] = None
                queue = self._pending_queue[layer][b]
                if queue is not None:
                    self._sink_queue[layer][b] = queue
                    self._pending_queue[layer][b] = None
            self._pending_frames[b] = None
            self._num_frames[b] = min(self.num_kv_cache, self._num_frames[b] + num_frames)
            position = self._position[b] + num_frames
            if self.rope_refresh_frames and position >= self.rope_refresh_frames:
                position = self.num_kv_cache - 1
            self._position[b] = position

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.num_layers}, batch={self.batch_size}, frames={self.num_kv_cache} "
            f"(sinks {self.num_sink}), tokens_per_frame={self.tokens_per_frame}, heads={self.num_heads}x"
            f"{self.head_dim}, dtype={self.dtype}, compat={self.compat}, positions={self._position}, "
            f"cached={self._num_frames})"
        )
