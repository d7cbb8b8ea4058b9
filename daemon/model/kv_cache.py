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
3. :meth:`KVCache.commit` ends the forward: slots flagged True advance their position (the chunk is done); the
   others keep it, so the next write is the same chunk again (no-batch mode runs the ``n`` denoising steps of one
   chunk on one cache; a stream-batch slot without a real chunk yet runs a filler). Once a position reaches
   ``rope_refresh_frames`` it is reset to ``num_kv_cache - 1`` (**RoPE refresh**, upstream's ``t_refresh``).

The cache fills (append), then each new frame overwrites an old non-sink frame in round robin; sink frames stay,
except by the **adaptive sink refresh**: when a single new frame arrives, for each sink frame ``j``:
``avg_j = (cos(mean K_sink_j, mean K_new) + cos(mean V_sink_j, mean V_new)) / 2`` (means over the frame's tokens,
cosine over heads·head_dim); if ``min_j avg_j < sink_threshold`` the new frame replaces the least similar sink. How
exactly is the ``compat`` setting (:func:`~.configs.check_compat`):

* ``"upstream"`` (default): StreamDiffusionV2's ``CausalWanSelfAttention.forward`` bookkeeping, ported as it is
  (the distilled weights were tuned with it). Per block and slot one queue of frame-slot ends (upstream's
  ``evict_idx``) and per slot its ``local_end``/``global_end``; on **every** write:

  - the sink check (in the cache dtype: bf16 on GPU), the fill phase and repeated writes of a chunk included; a
    sink not written yet counts as zeros (similarity 0); a chosen sink goes to the queue's front;
  - fill phase (``local_end`` below the cache size): write at ``local_end + end − global_end`` (a repeat of the
    same chunk: the same frames) and register the slot one chunk ahead on the queue's tail (so after the 2-frame
    first chunk frame slots 1 and 2 never join the round robin: with fewer than 3 sinks they are never evicted);
  - full phase: write the frames ending at the queue's front; pop it (a non-sink slot goes back to the tail), except
    that a batch-1 cache pops only every ``steps_per_chunk``-th write (upstream's ``current_step`` counter, so the
    ``n`` steps of a no-batch chunk aim at one slot; the counter runs across chunks as upstream's does).

  With the defaults (6 frames, 3 sinks, threshold 0.2; chunk 0 fills frames 0–1) chunk 1 finds sink frame 2 empty,
  queues it and fills it; chunks 2–4 fill frames 3–5; chunk 5, the first full-cache write, overwrites sink frame 2
  again; chunks 6, 7, 8, 9 … overwrite 3, 4, 5, 3 …
* ``"clean"``: sdlive's own rule. The check runs once per chunk, on its first write, and only once the cache is full;
  the chosen sink or the oldest non-sink frame is overwritten, and every write of the chunk in flight goes there
  (decided once per chunk; a chunk's repeats never move). Chunk 5 then overwrites frame 3.

Design choices (see also ``docs/architecture.md``):

* All bookkeeping is host ints (per slot; the queues per block and slot). The sink-refresh decision is taken like
  upstream's **per block** (inside every self-attention, on the block's own keys/values) but, with ``"upstream"``,
  **on the device and read back later**: the write goes to ``where(refresh, chosen sink, planned slot)`` by device
  indices, the block's queue is planned both ways, and the decisions of every block wait in the cache until one read
  takes them all: :meth:`KVCache.pending_sink_choices` / :meth:`KVCache.resolve_sink_choices` (the session reads them
  with its output frames, so a steady chunk reads the device once), else the next write of a block whose decision
  is pending (or a copy, a subset, a stage hand-over) reads them first. ``"clean"`` keeps its once-per-chunk
  decision on the device likewise: the chunk's writes (its repeats in no-batch mode too) go by device indices, and
  its commit plans each ring both ways until the same read.
* A threshold of ``-1`` (or lower) turns the refresh off (a cosine is never below −1, and the check is skipped).
* Slots may sit at different positions and frame counts (stream batch: slot ``i`` is one chunk behind slot
  ``i − 1``); ``write`` then reports each slot's valid length and attention runs per group of equal lengths (no
  mask, so every attention backend works, flash-attn included). ``commit`` takes one flag per slot, and
  :meth:`KVCache.subset` runs part of the slots on shared storage.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .configs import DEFAULT_CACHE_POLICY, DEFAULT_COMPAT, CachePolicy, Compat, check_compat, check_compat_policy

__all__ = ["CacheWindow", "CachePolicy", "KVCache", "PerBlockKV"]

_CHOSEN_SINK = -1
"""In a queue planned before the device's sink choice is read: the chosen sink frame's end (its slot + 1)."""


class _PendingSinks(NamedTuple):
    """One block's sink decisions not read back yet: per slot of ``slots`` the queue without a refresh and the one
    with (holding ``_CHOSEN_SINK``), and the device's choice (``-1``: no refresh, else the sink frame)."""

    layer: int
    slots: list[int]
    choice: torch.Tensor
    queues: list[tuple[list[int], list[int]]]


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
        compat: ``"upstream"`` (default): upstream's bookkeeping, quirks included (the distilled weights were tuned
            with it); ``"clean"``: sdlive's own rule (module docstring).
        steps_per_chunk: denoising steps per chunk of a batch-1 cache in no-batch mode (upstream's
            ``total_steps``: its full-phase writes pop the queue only every that many writes); also an attribute.
        layers: the blocks whose K/V this cache holds (a pipeline stage's, ``sdlive.daemon.distributed``; default:
            all); the others get empty ``[B, 0, heads, head_dim]`` tensors and ``commit`` waits only for these.
            The bookkeeping per slot is the same on every stage, so each stage's cache decides alike.
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
        steps_per_chunk: int = 1,
        layers: range | None = None,
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
        self.steps_per_chunk = steps_per_chunk
        self.layers: range = range(num_layers) if layers is None else layers
        if self.layers.step != 1 or not 0 <= self.layers.start < self.layers.stop <= num_layers:
            raise ValueError(f"layers must be a contiguous, non-empty range of the {num_layers} blocks, got {layers}")
        # The batch upstream's attention would see (its ``cache_bs``): a subset of a stream batch is still one.
        self._upstream_batch = batch_size

        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.key: list[torch.Tensor] = [self._layer_buffer(i, device, dtype) for i in range(num_layers)]
        """Per block: post-RoPE keys ``[B, num_kv_cache * tokens_per_frame, heads, head_dim]``."""
        self.value: list[torch.Tensor] = [self._layer_buffer(i, device, dtype) for i in range(num_layers)]
        """Per block: values, same shape as :attr:`key`."""
        self.reset()

    def _layer_buffer(self, layer: int, device: torch.device | str | None, dtype: torch.dtype) -> torch.Tensor:
        """Block ``layer``'s zeroed K or V buffer (empty when another pipeline stage holds the block)."""
        frames = self.num_kv_cache if layer in self.layers else 0
        shape = (self.batch_size, frames * self.tokens_per_frame, self.num_heads, self.head_dim)
        return torch.zeros(shape, device=device, dtype=dtype)

    @property
    def steps_per_chunk(self) -> int:
        return self._steps_per_chunk

    @steps_per_chunk.setter
    def steps_per_chunk(self, steps: int) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps_per_chunk must be a positive int, got {steps!r}")
        self._steps_per_chunk = steps
        self._countdown = steps  # upstream's current_step, restarted

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget every cached frame; positions restart at 0. The tensors are kept (stale data is never read)."""
        n, layers = self.batch_size, self.num_layers
        self._num_frames: list[int] = [0] * n  # frames held (upstream: its local_end, in frames)
        self._position: list[int] = [0] * n
        self._pending_frames: list[int | None] = [None] * n  # frames of the chunk in flight per slot (None: none)
        self._layers_written = [False] * layers  # by the forward in flight
        # clean: non-sink frame slots, oldest first (the round robin). upstream: its evict_idx, frame-slot *ends*.
        self._queue: list[list[list[int]]] = [[[] for _ in range(n)] for _ in range(layers)]
        # clean: the chunk in flight's decision per block and slot, kept until its commit; a sink check's choice
        # still on the device (its slots, the choice) and the device indices the chunk's writes go to meanwhile.
        self._decided: list[list[list[int] | None]] = [[None] * n for _ in range(layers)]
        self._clean_choice: list[tuple[list[int], torch.Tensor] | None] = [None] * layers
        self._clean_targets: list[torch.Tensor | None] = [None] * layers
        # upstream: per slot its global_end (frames), and both ends as the forward in flight leaves them.
        self._global_end: list[int] = [0] * n
        self._ends_after: list[tuple[int, int] | None] = [None] * n
        self._countdown = self._steps_per_chunk
        self._countdown_after: int | None = None
        self._pending_sinks: list[_PendingSinks] = []  # upstream: sink decisions still on the device

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
        """Frames held by slot ``b`` (at most ``num_kv_cache``)."""
        return self._num_frames[b]

    def ring_order(self, layer: int, b: int) -> list[int]:
        """Non-sink frame slots of block ``layer``, slot ``b``, in the order they will be overwritten.

        With ``compat="upstream"`` the fill phase registers each slot one chunk ahead, as upstream does (so it may
        name a slot not written yet, and frame slots 1 and 2 are never in it)."""
        self._resolve_sinks()
        if self.compat == "clean":
            return list(self._queue[layer][b])
        return [end - 1 for end in self._queue[layer][b] if end > self.num_sink]

    def sink_queue(self, layer: int, b: int) -> list[int]:
        """Sink frame slots of block ``layer``, slot ``b`` that the sink check chose and that are still to be
        overwritten, the next first (``compat="upstream"``: fill-phase choices wait for the cache to be full;
        always empty with ``"clean"``, which overwrites a chosen sink at once)."""
        if self.compat == "clean":
            return []
        self._resolve_sinks()
        return [end - 1 for end in self._queue[layer][b] if end <= self.num_sink]

    def frame_tokens(self, frame_slot: int) -> slice:
        """Token range of frame slot ``frame_slot`` inside :attr:`key` / :attr:`value`."""
        t = self.tokens_per_frame
        return slice(frame_slot * t, (frame_slot + 1) * t)

    # ------------------------------------------------------------------ copies

    _PER_SLOT = ("_num_frames", "_position", "_pending_frames", "_global_end", "_ends_after")
    _PER_BLOCK_SLOT = ("_queue", "_decided")

    def _copy_with(self, key: list[torch.Tensor], value: list[torch.Tensor], slots: Sequence[int]) -> KVCache:
        self._resolve_sinks(slots=slots)  # the copy's queues must be the real ones
        new = object.__new__(KVCache)
        new.__dict__.update(self.__dict__)
        new._pending_sinks = []
        new._clean_choice = [None] * self.num_layers
        new._clean_targets = [None] * self.num_layers
        new.batch_size = len(slots)
        new.key, new.value = key, value
        new._layers_written = [False] * self.num_layers
        for name in self._PER_SLOT:
            values = getattr(self, name)
            setattr(new, name, [values[i] for i in slots])
        for name in self._PER_BLOCK_SLOT:
            setattr(new, name, [[_copy(per_slot[i]) for i in slots] for per_slot in getattr(self, name)])
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
        new = self._copy_with(key, value, [0] * n)
        new._upstream_batch = n
        return new

    def select(self, i: int) -> KVCache:
        """A new batch-1 cache holding a copy of slot ``i`` (no-batch mode)."""
        if not 0 <= i < self.batch_size:
            raise IndexError(f"slot {i} out of range for a cache of {self.batch_size} slots")
        self._check_no_pending("select from")
        key = [k[i : i + 1].clone() for k in self.key]
        value = [v[i : i + 1].clone() for v in self.value]
        new = self._copy_with(key, value, [i])
        new._upstream_batch = 1
        return new

    @contextmanager
    def subset(self, start: int, stop: int) -> Iterator[KVCache]:
        """Slots ``[start, stop)`` as a cache of their own that shares this cache's tensors.

        Writes land in this cache's storage and the bookkeeping (frame counts, positions, queues, a chunk in flight)
        is copied back on exit. The stream batch runs the pipeline's drain (one slot at a time) and, with
        ``compat="clean"``, its filling calls (fewer chunks than slots) this way, without copying a tensor.
        """
        if not 0 <= start < stop <= self.batch_size:
            raise IndexError(f"slots [{start}, {stop}) out of range for a cache of {self.batch_size} slots")
        if start == 0 and stop == self.batch_size:
            yield self
            return
        slots = range(start, stop)
        view = self._copy_with([k[start:stop] for k in self.key], [v[start:stop] for v in self.value], slots)
        try:
            yield view
        finally:
            view._settle_clean_choices()  # a chunk's own choice in flight: read into its decisions
            # the view's decisions still on the device become this cache's, for its slots
            self._pending_sinks += [p._replace(slots=[slots[j] for j in p.slots]) for p in view._pending_sinks]
            for j, b in enumerate(slots):
                for name in self._PER_SLOT:
                    getattr(self, name)[b] = getattr(view, name)[j]
                for name in self._PER_BLOCK_SLOT:
                    for mine, theirs in zip(getattr(self, name), getattr(view, name), strict=True):
                        mine[b] = theirs[j]
            self._countdown, self._countdown_after = view._countdown, view._countdown_after

    # ------------------------------------------------------------------ pipeline stages

    def layer_bookkeeping(self, layer: int) -> tuple[list[list[int]], list[list[int] | None]]:
        """Block ``layer``'s own bookkeeping (its queues and decisions per slot), for a stage that takes it over."""
        self._resolve_sinks()
        return [list(q) for q in self._queue[layer]], [_copy(d) for d in self._decided[layer]]

    def adopt_layer(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        bookkeeping: tuple[list[list[int]], list[list[int] | None]],
    ) -> None:
        """Hold block ``layer`` from now on: its K/V buffers and bookkeeping as another stage had them."""
        self._resolve_sinks()
        expected = (self.batch_size, self.num_kv_cache * self.tokens_per_frame, self.num_heads, self.head_dim)
        if tuple(key.shape) != expected or tuple(value.shape) != expected:
            raise ValueError(f"block {layer}'s K/V {tuple(key.shape)} do not fit this cache's {expected}")
        self.key[layer], self.value[layer] = key, value
        self._queue[layer], self._decided[layer] = bookkeeping
        self.layers = _span(self.layers, layer, add=True)

    def release_layer(self, layer: int) -> None:
        """Stop holding block ``layer`` (another stage took it over): its buffers become empty."""
        self._resolve_sinks()
        self.layers = _span(self.layers, layer, add=False)
        self.key[layer] = self._layer_buffer(layer, self.device, self.dtype)
        self.value[layer] = self._layer_buffer(layer, self.device, self.dtype)

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

    def _sink_choice(self, layer: int, slots: list[int], key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Per slot in ``slots``, on the device: the least similar sink frame if its similarity is below the
        threshold, else -1 (``[len(slots)]`` int64, nothing read back).

        A sink frame the slot has not written yet counts as upstream's zero-initialised one: similarity 0.
        """
        t, s = self.tokens_per_frame, self.num_sink
        index = torch.tensor(slots, device=key.device) if len(slots) != self.batch_size else None
        # upstream takes the means and cosines in the cache dtype (bf16 on GPU); clean in float32.
        dtype = self.key[layer].dtype if self.compat == "upstream" else torch.float32

        def mean_cos(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            sinks = cache[:, : s * t] if index is None else cache.index_select(0, index)[:, : s * t]
            new = new if index is None else new.index_select(0, index)
            sink_mean = sinks.unflatten(1, (s, t)).to(dtype).mean(2).flatten(2)  # [n, S, heads*head_dim]
            new_mean = new.to(dtype).mean(1).flatten(1)  # [n, heads*head_dim]
            return F.cosine_similarity(sink_mean, new_mean[:, None], dim=-1)  # [n, S]

        avg = (mean_cos(self.key[layer], key) + mean_cos(self.value[layer], value)) / 2
        if any(self._num_frames[b] < s for b in slots):  # fill phase: cos(0, x) = 0, whatever the stale data
            written = torch.tensor([[j < self._num_frames[b] for j in range(s)] for b in slots], device=avg.device)
            avg = torch.where(written, avg, torch.zeros_like(avg))
        # argmin: the first of equal minima, as upstream's torch.argmin over one slot's sinks.
        least_similar = avg.argmin(dim=1)
        min_sim = avg.gather(1, least_similar[:, None])[:, 0]
        return torch.where(min_sim < self.sink_threshold, least_similar, torch.full_like(least_similar, -1))

    # ------------------------------------------------------------------ sink decisions on the device

    def pending_sink_choices(self) -> torch.Tensor | None:
        """The sink decisions still on the device, as one int64 tensor (values -1 … ``num_sink`` - 1), for a caller
        that reads them with its own device→host copy and hands them to :meth:`resolve_sink_choices`; None: none."""
        if not self._pending_sinks:
            return None
        return torch.cat([p.choice for p in self._pending_sinks])

    def resolve_sink_choices(self, values: Sequence[int]) -> None:
        """Apply the values of :meth:`pending_sink_choices` (read by the caller, in that order) to the queues."""
        pending, self._pending_sinks = self._pending_sinks, []
        if len(values) != sum(len(p.slots) for p in pending):
            raise ValueError(f"{len(values)} sink decisions for {sum(len(p.slots) for p in pending)} pending")
        at = 0
        for p in pending:
            for b, (without, with_refresh) in zip(p.slots, p.queues, strict=True):
                sink = int(values[at])
                at += 1
                self._queue[p.layer][b] = (
                    [sink + 1 if end == _CHOSEN_SINK else end for end in with_refresh] if sink >= 0 else without
                )

    def _resolve_sinks(self, layer: int | None = None, slots: Sequence[int] | None = None) -> None:
        """Read the pending decisions back (one read for all of them) when any is pending (for ``layer``, for one
        of ``slots``: a pipeline stage's per-slot subsets leave each other's decisions pending); with ``"clean"``
        also those of the chunk in flight (:meth:`_settle_clean_choices`)."""
        self._settle_clean_choices(layer)
        if self._pending_sinks and any(
            (layer is None or p.layer == layer) and (slots is None or not set(p.slots).isdisjoint(slots))
            for p in self._pending_sinks
        ):
            choices = self.pending_sink_choices()
            assert choices is not None
            self.resolve_sink_choices(choices.tolist())

    def _checks_sinks(self, num_frames: int) -> bool:
        return num_frames == 1 and self.num_sink > 0 and self.sink_threshold > -1.0

    def _plan_slot(self, b: int, queue: list[int], num_frames: int) -> tuple[int, tuple[int, int], int]:
        """Upstream's plan of one write for slot ``b`` (module docstring), updating ``queue`` in place: (the end of
        the frame slots written, the slot's ends after the write, the countdown after it)."""
        size, sinks = self.num_kv_cache, self.num_sink
        local_end = self._num_frames[b]
        end = self._position[b] + num_frames
        countdown = self._countdown
        if end > size or local_end >= size:
            if not queue:
                check_compat_policy(self.compat, self.policy)  # the known case, with its own message
                raise RuntimeError(f"no frame slot left to overwrite in {self!r}")
            target_end = queue[0]
            if self._upstream_batch == 1 and self._countdown > 1:
                countdown = self._countdown - 1  # a no-batch chunk's earlier step: the same slot next time
            else:
                popped = queue.pop(0)
                if popped > sinks:  # never the chosen sink (its end is at most `sinks`, _CHOSEN_SINK is below)
                    queue.append(popped)
                countdown = self._steps_per_chunk
            new_local_end = size
        else:
            new_local_end = local_end + end - self._global_end[b]
            target_end = new_local_end
            registered = end + num_frames  # upstream's rolling_end: the slot one chunk ahead
            if sinks < registered <= size and (not queue or queue[-1] != registered):
                queue.append(registered)
        return target_end, (new_local_end, end), countdown

    def _plan_upstream(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, num_frames: int
    ) -> list[list[int]] | torch.Tensor:
        """``compat="upstream"``: the frame slots of this write per slot, by upstream's rules (module docstring);
        updates the block's queues and leaves the slots' ends and the countdown for :meth:`commit`.

        With the sink check, the decision stays on the device: each slot is planned without and with a refresh,
        and the write goes by device indices (``[B]`` frame slots, returned as a tensor) when a full slot's target
        depends on it; the queues are settled when the decisions are read (:meth:`resolve_sink_choices`)."""
        self._resolve_sinks(layer)
        queues = self._queue[layer]
        countdown = self._countdown
        if not self._checks_sinks(num_frames):
            targets: list[list[int]] = []
            for b in range(self.batch_size):
                target_end, self._ends_after[b], countdown = self._plan_slot(b, queues[b], num_frames)
                targets.append(list(range(target_end - num_frames, target_end)))
            self._countdown_after = countdown
            return targets
        slots = list(range(self.batch_size))
        choice = self._sink_choice(layer, slots, key, value)
        plans: list[tuple[list[int], list[int]]] = []
        ends: list[tuple[int, int]] = []
        without_ends: list[int] = []
        full: list[bool] = []
        try:
            for b in slots:
                with_refresh = [_CHOSEN_SINK, *queues[b]]
                with_end, slot_ends, countdown = self._plan_slot(b, with_refresh, num_frames)
                without = list(queues[b])
                without_end, _, _ = self._plan_slot(b, without, num_frames)
                plans.append((without, with_refresh))
                ends.append(slot_ends)
                without_ends.append(without_end)
                full.append(with_end == _CHOSEN_SINK)
        except (RuntimeError, ValueError):
            # No slot left unless the refresh frees one (a configuration upstream also fails on): decide now.
            for b, sink in enumerate(choice.tolist()):
                if sink >= 0:
                    queues[b].insert(0, sink + 1)
            targets = []
            for b in slots:
                target_end, self._ends_after[b], countdown = self._plan_slot(b, queues[b], num_frames)
                targets.append(list(range(target_end - num_frames, target_end)))
            self._countdown_after = countdown
            return targets
        for b in slots:
            queues[b] = plans[b][0]  # until the decision is read
            self._ends_after[b] = ends[b]
        self._countdown_after = countdown
        self._pending_sinks.append(_PendingSinks(layer, slots, choice, plans))
        if not any(full):  # fill phase: the write goes where it goes either way, only the queues wait
            return [[end - 1] for end in without_ends]
        no_refresh = torch.tensor(without_ends, device=choice.device)
        refresh = (choice >= 0) & torch.tensor(full, device=choice.device)
        return torch.where(refresh, choice + 1, no_refresh) - 1

    def _settle_clean_choices(self, layer: int | None = None) -> None:
        """``"clean"``: read the sink choices of the chunk in flight still on the device (of ``layer``, or all) into
        its decisions; its writes go by those lists from then on."""
        layers = [i for i in (self.layers if layer is None else [layer]) if self._clean_choice[i] is not None]
        if not layers:
            return
        choices = torch.cat([self._clean_choice[i][1] for i in layers]).tolist()  # type: ignore[index]
        at = 0
        for i in layers:
            checked, _ = self._clean_choice[i]  # type: ignore[misc]
            for b in checked:
                if choices[at] >= 0:
                    self._decided[i][b] = [choices[at]]
                at += 1
            self._clean_choice[i] = self._clean_targets[i] = None

    def _plan_clean(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, num_frames: int
    ) -> list[list[int]] | torch.Tensor:
        """``compat="clean"``: the frame slots of the chunk in flight per slot, decided on its first write.

        The sink check's choice stays on the device when every slot starts its chunk at once (the steady state): the
        chunk's writes go by device indices (``[B]``, one frame per slot, returned as a tensor), and :meth:`commit`
        plans the rings both ways until the choice is read (:meth:`resolve_sink_choices`)."""
        decided = self._decided[layer]
        targets = self._clean_targets[layer]
        if targets is not None and all(d is not None for d in decided):
            return targets  # a repeat of the chunk in flight: the same frame slots
        self._resolve_sinks(layer)  # the rings are read below
        fresh = [b for b in range(self.batch_size) if decided[b] is None]
        for b in fresh:
            cached, ring = self._num_frames[b], self._queue[layer][b]
            planned: list[int] = []
            for f in range(num_frames):
                if cached + f < self.num_kv_cache:
                    planned.append(cached + f)
                else:
                    # Frames appended by this same chunk join the ring's tail after the ones already there.
                    candidates = ring + [s for s in planned if s >= self.num_sink]
                    if f - (self.num_kv_cache - cached) >= len(candidates):
                        raise RuntimeError(f"no non-sink frame slot left to overwrite in {self!r}")
                    planned.append(candidates[f - (self.num_kv_cache - cached)])
            decided[b] = planned
        checked = [b for b in fresh if self._num_frames[b] == self.num_kv_cache]
        if checked and self._checks_sinks(num_frames):
            choice = self._sink_choice(layer, checked, key, value)
            if len(fresh) == self.batch_size:
                self._clean_choice[layer] = (checked, choice)
                planned_slots = torch.tensor([d[0] for d in decided], device=choice.device)  # type: ignore[index]
                rows = torch.tensor(checked, device=choice.device)
                targets = planned_slots.index_put((rows,), torch.where(choice >= 0, choice, planned_slots[rows]))
                self._clean_targets[layer] = targets
                return targets
            for b, sink in zip(checked, choice.tolist(), strict=True):  # a partial start: decide now
                if sink >= 0:
                    decided[b] = [sink]
        return [list(d) for d in decided if d is not None]

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
        if self.compat == "upstream":
            targets = self._plan_upstream(layer, key, value, num_frames)
            valid = [ends[0] for ends in self._ends_after if ends is not None]
        else:
            targets = self._plan_clean(layer, key, value, num_frames)
            valid = [min(self.num_kv_cache, n + num_frames) for n in self._num_frames]
        self._layers_written[layer] = True
        for b in range(batch_size):
            self._pending_frames[b] = num_frames

        # Write the chunk: one slice copy per frame when every slot uses the same frame slots.
        cache_k, cache_v, t = self.key[layer], self.value[layer], self.tokens_per_frame
        key, value = key.to(cache_k.dtype), value.to(cache_v.dtype)
        if isinstance(targets, torch.Tensor):  # one frame per slot, its slot decided on the device
            rows = torch.arange(batch_size, device=targets.device)
            frames_k = cache_k.view(batch_size, self.num_kv_cache, t, *cache_k.shape[2:])
            frames_v = cache_v.view(batch_size, self.num_kv_cache, t, *cache_v.shape[2:])
            frames_k[rows, targets] = key
            frames_v[rows, targets] = value
        elif all(p == targets[0] for p in targets):
            for f, slot in enumerate(targets[0]):
                cache_k[:, slot * t : (slot + 1) * t] = key[:, f * t : (f + 1) * t]
                cache_v[:, slot * t : (slot + 1) * t] = value[:, f * t : (f + 1) * t]
        else:
            for b in range(batch_size):
                for f, slot in enumerate(targets[b]):
                    cache_k[b, slot * t : (slot + 1) * t] = key[b, f * t : (f + 1) * t]
                    cache_v[b, slot * t : (slot + 1) * t] = value[b, f * t : (f + 1) * t]

        # Attend over the valid frames (fill phase: a prefix of the buffer).
        longest = max(valid)
        lengths = None if min(valid) == longest else [v * t for v in valid]
        return CacheWindow(cache_k[:, : longest * t], cache_v[:, : longest * t], lengths)

    def commit(self, slots: bool | Sequence[bool] = True) -> None:
        """End the forward in flight. Slots flagged True end their chunk: their position advances (with the RoPE
        refresh), and with ``compat="clean"`` the frame count and the ring. Slots flagged False keep their chunk in
        flight: the next ``write`` is the same chunk again (``"clean"``: the same frame slots; ``"upstream"``: where
        upstream's bookkeeping puts a repeat)."""
        flags = [bool(slots)] * self.batch_size if isinstance(slots, bool) else [bool(s) for s in slots]
        if len(flags) != self.batch_size:
            raise ValueError(f"commit() got {len(flags)} flags for {self.batch_size} slots")
        written = [self._layers_written[i] for i in self.layers]
        if any(self._pending_frames) and any(written) and not all(written):
            missing = self.layers[written.index(False)]
            raise RuntimeError(f"block {missing} never wrote the chunk in flight; cannot commit")
        upstream = self.compat == "upstream"
        if upstream:
            for b, ends in enumerate(self._ends_after):
                if ends is not None:
                    self._num_frames[b], self._global_end[b] = ends
                    self._ends_after[b] = None
            if self._countdown_after is not None:
                self._countdown, self._countdown_after = self._countdown_after, None
        if not upstream:
            self._commit_clean_choices(flags)
        for b, flag in enumerate(flags):
            num_frames = self._pending_frames[b]
            if not flag or num_frames is None:
                continue
            if not upstream:
                for layer in range(self.num_layers):
                    ring = self._queue[layer][b]
                    for slot in self._decided[layer][b] or ():
                        if slot < self.num_sink:
                            continue  # fill of a sink frame, or a sink refresh: the ring is unchanged
                        if slot in ring:
                            ring.remove(slot)  # overwritten: it becomes the newest non-sink frame
                        ring.append(slot)
                    self._decided[layer][b] = None
                self._num_frames[b] = min(self.num_kv_cache, self._num_frames[b] + num_frames)
            self._pending_frames[b] = None
            position = self._position[b] + num_frames
            if self.rope_refresh_frames and position >= self.rope_refresh_frames:
                position = self.num_kv_cache - 1
            self._position[b] = position
        self._layers_written = [False] * self.num_layers

    def _commit_clean_choices(self, flags: list[bool]) -> None:
        """``"clean"`` commit of chunks whose sink choice is still on the device: the slots that end their chunk get
        their ring planned both ways (a refresh leaves it as it is; else the written slot becomes the newest) and
        the choice waits for :meth:`resolve_sink_choices`; slots that keep the chunk in flight keep the choice."""
        for layer in self.layers:
            pending = self._clean_choice[layer]
            if pending is None:
                continue
            checked, choice = pending
            ending = [flags[b] and self._pending_frames[b] is not None for b in checked]
            if not any(ending):
                continue
            if not all(ending):  # some slots end the chunk, others keep it: decide now
                self._settle_clean_choices(layer)
                continue
            plans: list[tuple[list[int], list[int]]] = []
            for b in checked:
                ring, (slot,) = self._queue[layer][b], self._decided[layer][b]  # type: ignore[misc]
                without = [s for s in ring if s != slot] + ([slot] if slot >= self.num_sink else [])
                plans.append((without, list(ring)))
                self._queue[layer][b] = without  # until the choice is read
                self._decided[layer][b] = []  # the ring is planned: nothing left for the commit below
            self._pending_sinks.append(_PendingSinks(layer, list(checked), choice, plans))
            self._clean_choice[layer] = self._clean_targets[layer] = None

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.num_layers}, batch={self.batch_size}, frames={self.num_kv_cache} "
            f"(sinks {self.num_sink}), tokens_per_frame={self.tokens_per_frame}, heads={self.num_heads}x"
            f"{self.head_dim}, dtype={self.dtype}, compat={self.compat}, positions={self._position}, "
            f"cached={self._num_frames})"
        )


def _span(layers: range, layer: int, *, add: bool) -> range:
    """``layers`` with ``layer`` added at (or removed from) one end; the held blocks stay contiguous."""
    if add:
        if layer == layers.start - 1:
            return range(layer, layers.stop)
        if layer == layers.stop:
            return range(layers.start, layer + 1)
    elif len(layers) > 1 and layer in (layers.start, layers.stop - 1):
        return range(layers.start + 1, layers.stop) if layer == layers.start else range(layers.start, layers.stop - 1)
    raise ValueError(f"block {layer} cannot be {'added to' if add else 'removed from'} blocks {layers.start}-"
                     f"{layers.stop - 1}: a stage holds one contiguous, non-empty range")


def _copy(value: list[int] | None) -> list[int] | None:
    return None if value is None else list(value)
