"""KVCache ``compat``: upstream's fill-phase adaptive sink check (the default) against sdlive's full-phase-only one,
chunk by chunk against hand traces of upstream's ``CausalWanSelfAttention.forward`` (its ``evict_idx`` list).

Frames carry a common direction (channel 0 = 1) so every written frame is similar to every other (cosine ≈ 1, the
sink check never fires on them), plus a small tag (channel 1 = id / 1000) that tells which frame sits in which
cache slot. A frame slot never written holds zeros: upstream's cache is zero-initialised, and its cosine with a
zero sink is 0, below the threshold 0.2.
"""

from __future__ import annotations

import pytest
import torch

from sdlive.daemon.model.configs import DEFAULT_COMPAT, Compat, check_compat, check_compat_policy
from sdlive.daemon.model.kv_cache import CachePolicy, KVCache

T, H, D = 3, 2, 4  # tokens per frame, heads, head dim


def make_cache(compat: Compat, *, batch_size: int = 1, policy: CachePolicy | None = None) -> KVCache:
    return KVCache(
        num_layers=2, batch_size=batch_size, tokens_per_frame=T, num_heads=H, head_dim=D,
        policy=policy or CachePolicy(), compat=compat,
    )  # fmt: skip


def frames(*ids: int, batch: int = 1) -> torch.Tensor:
    """[batch, F*T, H, D]: per frame, channel 0 = 1 (shared direction), channel 1 = id / 1000 (the tag)."""
    x = torch.zeros(batch, len(ids) * T, H, D)
    for f, fid in enumerate(ids):
        x[:, f * T : (f + 1) * T, :, 0] = 1.0
        x[:, f * T : (f + 1) * T, :, 1] = fid / 1000
    return x


def directed(vec: list[float]) -> torch.Tensor:
    """One frame [1, T, H, D] whose every token (in every head) is ``vec``."""
    return torch.tensor(vec, dtype=torch.float32).expand(1, T, H, D).clone()


def push(cache: KVCache, chunk: torch.Tensor, steps: int = 1) -> None:
    """One chunk into every block, ``steps`` times (no-batch mode: the same chunk once per denoising step), committed
    on the last."""
    for step in range(steps):
        for layer in range(cache.num_layers):
            cache.write(layer, chunk, chunk)
        cache.commit(step == steps - 1)


def slot_ids(cache: KVCache, layer: int = 0, b: int = 0) -> list[int | None]:
    """The tag of each frame slot (None: never written)."""
    out: list[int | None] = []
    for s in range(cache.num_kv_cache):
        token = cache.key[layer][b, s * T, 0]
        out.append(None if token[0].item() == 0 else round(token[1].item() * 1000))
    return out


# Upstream with the defaults (6 frames, 3 sinks, threshold 0.2), in frame units (its evict_idx holds token ends,
# here divided by tokens_per_frame): chunk 0 is 2 frames (no check: not a single frame) → frames 0-1, evict [4];
# chunk 1: sink frame 2 is empty, avg cos 0 < 0.2 → evict.insert(0, 3) → [3, 4]; a fill write → frame 2;
# chunks 2, 3, 4: fill → frames 3, 4, 5 (evict [3, 4, 5, 6]); chunk 5: the cache is full, target evict[0] = 3 →
# frame 2, the sink, is overwritten and 3 (not > 3 sinks) is not re-appended → [4, 5, 6]; chunks 6, 7, 8, 9: frames
# 3, 4, 5, 3 (round robin).   sdlive "clean": no check until full; chunk 5 → frame 3, then 4, 5, 3, 4.
# Per chunk: (the frame slot written, the sink queue after the chunk).
UPSTREAM_TRACE = [([0, 1], []), ([2], [2]), ([3], [2]), ([4], [2]), ([5], [2]),
                  ([2], []), ([3], []), ([4], []), ([5], []), ([3], [])]  # fmt: skip
CLEAN_TRACE = [([0, 1], []), ([2], []), ([3], []), ([4], []), ([5], []),
               ([3], []), ([4], []), ([5], []), ([3], []), ([4], [])]  # fmt: skip


@pytest.mark.parametrize(
    ("compat", "trace", "steps"),
    [("upstream", UPSTREAM_TRACE, 1), ("clean", CLEAN_TRACE, 1), ("clean", CLEAN_TRACE, 2)],
    ids=["upstream", "clean", "clean-no-batch-2-steps"],
)
def test_eviction_order_chunk_by_chunk(compat, trace, steps):
    """Which frame slot each chunk writes and when the empty sink frame 2 is queued (upstream: chunk 1) and overwritten
    (upstream: chunk 5, the first full-cache write), in both modes. Clean with 2 steps per chunk (no-batch mode): the
    check runs once, on the chunk's first write, and its repeats rewrite the same slot (upstream's repeats: next
    test)."""
    cache = make_cache(compat)
    expected: list[int | None] = [None] * 6
    for chunk, (written, queue) in enumerate(trace):
        ids = [100 + chunk * 10 + f for f in range(len(written))]
        push(cache, frames(*ids), steps=steps)
        for slot, fid in zip(written, ids, strict=True):
            expected[slot] = fid
        for layer in range(cache.num_layers):
            assert slot_ids(cache, layer) == expected, (chunk, layer)
            assert cache.sink_queue(layer, 0) == queue, (chunk, layer)
    assert cache.frame_position(0) == 11 and cache.num_cached_frames(0) == 6
    # After the trace: upstream's evict_idx is [5, 6, 4] (ends) = frame slots [4, 5, 3]; the clean ring rotated once
    # more (it spent no write on a sink).
    assert cache.ring_order(0, 0) == ([4, 5, 3] if compat == "upstream" else [5, 3, 4])
    assert slot_ids(cache)[2] == (150 if compat == "upstream" else 110)  # the third sink: chunk 5's frame or chunk 1's


# Upstream, no-batch mode with 2 steps per chunk (each step writes the same chunk again; the frames never fire the
# check except on the empty sink 2). Its batch-1 ``current_step`` counter starts at 2. Chunks 0-3 as with 1 step
# (the repeats of a fill write land on the same slot: local_end + end - global_end is unchanged). Chunk 4: step 0 fills
# frame 5, which makes local_end the cache size, so step 1 is a full-phase write: evict[0] = sink 2 gets it, and the
# counter (2 > 1) drops to 1 without a pop. From then on the counter is one write out of step: each chunk's step 0 pops
# (chunk 5: sink 2, not re-appended; chunk 6: 3, re-appended …) and its step 1 goes to the next slot in the queue,
# which the next chunk's step 0 overwrites. Per chunk: the frame tag of every slot after the chunk.
UPSTREAM_NO_BATCH_2_STEPS = [
    [100, 101, None, None, None, None],
    [100, 101, 110, None, None, None],
    [100, 101, 110, 120, None, None],
    [100, 101, 110, 120, 130, None],
    [100, 101, 140, 120, 130, 140],
    [100, 101, 150, 150, 130, 140],
    [100, 101, 150, 160, 160, 140],
    [100, 101, 150, 160, 170, 170],
    [100, 101, 150, 180, 170, 180],
    [100, 101, 150, 190, 190, 180],
]


def test_upstream_no_batch_repeats_follow_upstreams_step_counter_chunk_by_chunk():
    cache = make_cache("upstream")
    cache.steps_per_chunk = 2
    for chunk, expected in enumerate(UPSTREAM_NO_BATCH_2_STEPS):
        ids = [100, 101] if chunk == 0 else [100 + chunk * 10]
        push(cache, frames(*ids), steps=2)
        for layer in range(cache.num_layers):
            assert slot_ids(cache, layer) == expected, (chunk, layer)
        assert cache.sink_queue(0, 0) == ([2] if 1 <= chunk <= 4 else []), chunk
    assert cache.ring_order(0, 0) == [4, 5, 3]


def test_upstream_queues_every_fill_phase_choice_and_serves_them_front_first():
    """Hand trace (upstream, frame units): chunk 0 = A, A' → frames 0-1, evict [4]. Chunk 1 = B: sink 2 empty → [3, 4]
    (B → frame 2). Chunk 2 = C, orthogonal to every sink (all three avg cos 0, torch.argmin takes the first) →
    evict.insert(0, 1) → [1, 3, 4, 5] (C → frame 3). Chunks 3, 4 = D (similar to the sinks) → frames 4, 5. Chunk 5:
    target 1 → frame 0; chunk 6: the check passes (every sink similar), target 3 → frame 2; chunk 7: target 4 →
    frame 3, the round robin again."""
    a, a2, b = directed([1, 0, 0, 0]), directed([1, 0.1, 0, 0]), directed([1, 0.2, 0, 0])
    c, d = directed([0, 0, 0, 1]), directed([1, 0.05, 0, 0.1])
    cache = make_cache("upstream")
    push(cache, torch.cat([a, a2], dim=1))
    push(cache, b)
    assert cache.sink_queue(0, 0) == [2]
    push(cache, c)
    assert cache.sink_queue(0, 0) == [0, 2] and torch.equal(cache.key[0][0, 3 * T], c[0, 0])
    push(cache, d)
    push(cache, d)
    assert cache.sink_queue(0, 0) == [0, 2] and cache.num_cached_frames(0) == 6
    e, f, g = directed([1, 0.06, 0, 0.1]), directed([1, 0.07, 0, 0.1]), directed([1, 0.08, 0, 0.1])
    push(cache, e)
    assert torch.equal(cache.key[0][0, 0], e[0, 0]) and cache.sink_queue(0, 0) == [2]
    push(cache, f)
    assert torch.equal(cache.key[0][0, 2 * T], f[0, 0]) and cache.sink_queue(0, 0) == []
    push(cache, g)
    assert torch.equal(cache.key[0][0, 3 * T], g[0, 0])  # C, the oldest non-sink frame, goes
    assert torch.equal(cache.key[0][0, T], a2[0, 0])  # sink 1 was never chosen
    assert cache.ring_order(0, 0) == [4, 5, 3]

    clean = make_cache("clean")
    for chunk in (torch.cat([a, a2], dim=1), b, c, d, d, e):
        push(clean, chunk)
    assert torch.equal(clean.key[0][0, :T], a[0]) and torch.equal(clean.key[0][0, 3 * T], e[0, 0])


def test_upstream_fill_phase_check_per_slot_in_a_stream_batch():
    """Two slots of a stream batch: each queues its empty sink at its chunk 1 and spends it at its own first
    full-cache write (slot 0 runs ahead through a subset, as in the pipeline's fill)."""
    one = make_cache("upstream")
    push(one, frames(10, 11))
    cache = one.repeat(2)
    push(cache, frames(12, batch=2), steps=1)  # both slots: chunk 1
    assert cache.sink_queue(0, 0) == cache.sink_queue(0, 1) == [2]
    for fid in (13, 14, 15):
        push(cache, frames(fid, batch=2))
    with cache.subset(0, 1) as ahead:
        push(ahead, frames(16))  # slot 0's chunk 5: the queued sink frame 2
    assert slot_ids(cache, b=0) == [10, 11, 16, 13, 14, 15] and cache.sink_queue(0, 0) == []
    assert slot_ids(cache, b=1) == [10, 11, 12, 13, 14, 15] and cache.sink_queue(0, 1) == [2]
    push(cache, frames(17, batch=2))  # slot 0: frame 3 (round robin); slot 1: its chunk 5, the sink frame 2
    assert slot_ids(cache, b=0) == [10, 11, 16, 17, 14, 15]
    assert slot_ids(cache, b=1) == [10, 11, 17, 13, 14, 15] and cache.sink_queue(0, 1) == []


def test_upstream_check_off_with_threshold_minus_one_and_after_reset():
    cache = make_cache("upstream", policy=CachePolicy(sink_threshold=-1.0))
    for chunk in ([10, 11], [12], [13], [14], [15], [16]):
        push(cache, frames(*chunk))
    assert slot_ids(cache) == [10, 11, 12, 16, 14, 15] and cache.sink_queue(0, 0) == []
    on = make_cache("upstream")
    push(on, frames(10, 11))
    push(on, frames(12))
    assert on.sink_queue(1, 0) == [2]
    on.reset()
    assert on.sink_queue(1, 0) == []
    push(on, frames(20, 21))
    push(on, frames(22))  # the stale tag-12 frame in slot 2 still counts as empty: queued again
    assert on.sink_queue(0, 0) == [2]


def test_compat_default_and_validation():
    assert DEFAULT_COMPAT == "upstream" and make_cache(DEFAULT_COMPAT).compat == "upstream"
    assert KVCache(num_layers=1, batch_size=1, tokens_per_frame=T, num_heads=H, head_dim=D).compat == "upstream"
    assert check_compat("clean") == "clean"
    for bad in ("Upstream", "", None, 1):
        with pytest.raises(ValueError, match="compat must be one of 'upstream', 'clean'"):
            check_compat(bad)
    with pytest.raises(ValueError, match="compat"):
        make_cache("fast")  # type: ignore[arg-type]


# Fewer sinks (sink check off, to follow the ring alone). Upstream registers, on each fill write, the slot ending at
# current_end + chunk length (frame units, evict_idx ends): 5 frames / 2 sinks: chunk 0 (2 frames) → slots 0-1,
# registers end 4 → ring [3]; chunk 1 → slot 2, end 4 again (not re-added); chunk 2 → slot 3, end 5 → ring [3, 4];
# chunk 3 → slot 4, end 6 > 5; chunks 4, 5, 6, 7 → slots 3, 4, 3, 4: frame 2 is never evicted (upstream's --fast
# setting). 4 frames / 1 sink: chunk 0 registers end 4 → ring [3]; chunk 1 → slot 2 (end 4 again); chunk 2 → slot 3,
# end 5 > 4; every later chunk → slot 3: frames 1 and 2 stay. Clean rotates every non-sink frame: 5/2 ring [2, 3, 4]
# → slots 2, 3, 4, 2; 4/1 ring [1, 2, 3] → slots 1, 2, 3, 1.
FEW_SINKS = [
    (CachePolicy(num_kv_cache=5, num_sink=2, sink_threshold=-1), "upstream", [3, 4], [10, 11, 12, 170, 180]),
    (CachePolicy(num_kv_cache=5, num_sink=2, sink_threshold=-1), "clean", [2, 3, 4], [10, 11, 180, 160, 170]),
    (CachePolicy(num_kv_cache=4, num_sink=1, sink_threshold=-1), "upstream", [3], [10, 11, 12, 180]),
    (CachePolicy(num_kv_cache=4, num_sink=1, sink_threshold=-1), "clean", [1, 2, 3], [10, 180, 160, 170]),
]


@pytest.mark.parametrize(("policy", "compat", "ring_when_full", "final"), FEW_SINKS)
def test_fewer_sinks_upstream_never_evicts_the_slots_its_ring_skips(policy, compat, ring_when_full, final):
    cache = make_cache(compat, policy=policy)
    push(cache, frames(10, 11))
    if compat == "upstream":
        assert cache.ring_order(0, 0) == [3]  # registered one chunk ahead, before it is written
    fid = 12
    while cache.num_cached_frames(0) < policy.num_kv_cache:
        push(cache, frames(fid))
        fid += 1
    assert cache.ring_order(0, 0) == ring_when_full and cache.ring_order(1, 0) == ring_when_full
    for fid in (150, 160, 170, 180):  # four full-cache writes
        push(cache, frames(fid))
    assert slot_ids(cache) == final and slot_ids(cache, layer=1) == final


def test_upstream_needs_four_cache_frames():
    """3 frames / 1 sink: upstream's ring never holds slots 1-2, so after chunk 0 (slots 0-1) and chunk 1 (slot 2) the
    first full-cache write has nothing to overwrite (upstream: IndexError on evict_idx[0]). sdlive says why, and
    refuses the pair up front (``check_compat_policy``); clean streams on."""
    policy = CachePolicy(num_kv_cache=3, num_sink=1, sink_threshold=-1)
    with pytest.raises(ValueError, match="compat='upstream'.*num_kv_cache >= 4"):
        check_compat_policy("upstream", policy)
    check_compat_policy("clean", policy)
    check_compat_policy("upstream", CachePolicy(num_kv_cache=4, num_sink=1))
    cache = make_cache("upstream", policy=policy)
    push(cache, frames(10, 11))
    push(cache, frames(12))
    with pytest.raises(ValueError, match="num_kv_cache >= 4"):
        push(cache, frames(13))
    clean = make_cache("clean", policy=policy)
    for chunk in ([10, 11], [12], [13], [14]):
        push(clean, frames(*chunk))
    assert slot_ids(clean) == [10, 13, 14]


def upstream_reference(policy: CachePolicy, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """A line-by-line port of upstream's cache bookkeeping (``CausalWanSelfAttention.forward`` at c5a0f20, one batch
    slot, one step per chunk): the cache after each chunk. ``chunks``: [1, F*T, H, D] keys (= values)."""
    k_cache = torch.zeros(1, policy.num_kv_cache * T, H, D)
    v_cache = torch.zeros_like(k_cache)
    kv_cache_size, sink_size, frame_seqlen = policy.num_kv_cache * T, policy.num_sink, T
    evict_idx: list[int] = []
    global_end = local_end = 0
    c_start = 0
    out = []
    for chunk in chunks:
        roped_key = v = chunk
        num_new_tokens = chunk.shape[1]
        current_end = c_start + num_new_tokens
        sink_tokens = sink_size * frame_seqlen
        if sink_tokens > 0 and policy.sink_threshold > -1 and v.shape[1] <= frame_seqlen:
            k_sink_mean = k_cache[0:1, :sink_tokens].reshape(sink_size, frame_seqlen, -1).mean(1)
            k_new_mean = roped_key[0:1].reshape(1, frame_seqlen, -1).mean(1)
            k_cos_sim = torch.cosine_similarity(k_sink_mean, k_new_mean, dim=-1)
            v_sink_mean = v_cache[0:1, :sink_tokens].reshape(sink_size, frame_seqlen, -1).mean(1)
            v_new_mean = v[0:1].reshape(1, frame_seqlen, -1).mean(1)
            v_cos_sim = torch.cosine_similarity(v_sink_mean, v_new_mean, dim=-1)
            avg_cos_sim = (k_cos_sim + v_cos_sim) / 2
            if avg_cos_sim.min() < policy.sink_threshold:
                evict_idx.insert(0, (torch.argmin(avg_cos_sim).item() + 1) * frame_seqlen)
        if current_end > kv_cache_size or local_end >= kv_cache_size:
            global_end, local_end = c_start, kv_cache_size
            target_end = evict_idx[0]
            popped = evict_idx.pop(0)
            if popped > sink_tokens:
                evict_idx.append(popped)
            k_cache[0:1, target_end - num_new_tokens : target_end] = roped_key
            v_cache[0:1, target_end - num_new_tokens : target_end] = v
        else:
            local_end = local_end + current_end - global_end
            rolling_end = current_end + num_new_tokens
            if sink_tokens < rolling_end <= kv_cache_size and (not evict_idx or evict_idx[-1] != rolling_end):
                evict_idx.append(rolling_end)
            k_cache[0:1, local_end - num_new_tokens : local_end] = roped_key
            v_cache[0:1, local_end - num_new_tokens : local_end] = v
        global_end = current_end
        c_start = current_end
        out.append(k_cache.clone())
    return out


@pytest.mark.parametrize(
    "policy",
    [
        CachePolicy(),
        CachePolicy(sink_threshold=0.5),
        CachePolicy(num_kv_cache=5, num_sink=2),
        CachePolicy(num_kv_cache=8, num_sink=1, sink_threshold=0.0),
        CachePolicy(num_kv_cache=4, num_sink=2, sink_threshold=-1),
        CachePolicy(num_kv_cache=7, num_sink=0),
    ],
    ids=["default", "threshold-0.5", "5-frames-2-sinks", "8-frames-1-sink", "4-frames-2-sinks-off", "no-sinks"],
)
def test_upstream_mode_equals_a_port_of_upstreams_code_chunk_by_chunk(policy):
    """Random frames in a shared half-space (cosines spread over about [-0.3, 1]: the sink check fires now and then,
    in the fill and the full phase), 30 chunks (no RoPE refresh in upstream's attention code): the cache after every
    chunk is the port's, bitwise."""
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(1, (2 if i == 0 else 1) * T, H, D, generator=g) + 0.3 for i in range(30)]
    expected = upstream_reference(policy, chunks)
    cache = KVCache(
        num_layers=1, batch_size=1, tokens_per_frame=T, num_heads=H, head_dim=D, policy=policy, compat="upstream"
    )
    sinks = policy.num_sink * T
    queued = refreshed = 0
    for i, (chunk, want) in enumerate(zip(chunks, expected, strict=True)):
        was_full = cache.num_cached_frames(0) == policy.num_kv_cache
        queue_before, sinks_before = cache.sink_queue(0, 0), cache.key[0][:, :sinks].clone()
        cache.write(0, chunk, chunk)
        cache.commit()
        assert torch.equal(cache.key[0], want), i
        assert torch.equal(cache.value[0], want), i
        queued += not was_full and len(cache.sink_queue(0, 0)) > len(queue_before)
        refreshed += was_full and not torch.equal(cache.key[0][:, :sinks], sinks_before)
    if policy.num_sink and policy.sink_threshold > -1:  # both phases' checks were exercised
        assert queued and refreshed, (queued, refreshed)


class UpstreamCachePort:
    """A line-by-line port of upstream's whole cache bookkeeping (``CausalWanSelfAttention.forward`` at c5a0f20) for a
    batch of slots: the per-slot loop, the sink check on every call (the cache dtype's precision), ``evict_idx`` per
    slot (copied from slot 0 when the batch grows, as upstream's ``len(self.evict_idx) < cache_bs`` branch does), and
    the batch-1 ``current_step`` counter that makes no-batch mode's repeated steps pop only at the last step."""

    def __init__(self, policy: CachePolicy, total_steps: int, dtype: torch.dtype = torch.float32) -> None:
        self.policy, self.total_steps = policy, total_steps
        self.k = torch.zeros(1, policy.num_kv_cache * T, H, D, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.global_end, self.local_end = [0], [0]
        self.current_step = total_steps
        self.evict_idx: list[list[int]] = [[]]

    def repeat(self, n: int) -> None:
        """``prepare``'s end: the caches and their end indices repeated to the stream batch."""
        self.k, self.v = self.k.repeat(n, 1, 1, 1), self.v.repeat(n, 1, 1, 1)
        self.global_end, self.local_end = self.global_end * n, self.local_end * n

    def forward(self, key: torch.Tensor, value: torch.Tensor, starts: list[int]) -> None:
        kv_cache_size, sink_size, frame_seqlen = self.k.shape[1], self.policy.num_sink, T
        self.fired = 0  # sink checks that chose a sink in this call (test bookkeeping, not upstream's)
        cache_bs = self.k.shape[0]
        if len(self.evict_idx) < cache_bs:
            self.evict_idx = [self.evict_idx[0].copy() for _ in range(cache_bs)]
        for i, c_start in enumerate(starts):
            num_new_tokens = key.shape[1]
            current_end = c_start + num_new_tokens
            sink_tokens = sink_size * frame_seqlen
            if sink_tokens > 0 and self.policy.sink_threshold > -1 and value.shape[1] <= frame_seqlen:
                k_sink_mean = self.k[i : i + 1, :sink_tokens].reshape(sink_size, frame_seqlen, -1).mean(1)
                k_new_mean = key[i : i + 1].reshape(1, frame_seqlen, -1).mean(1)
                k_cos_sim = torch.cosine_similarity(k_sink_mean, k_new_mean, dim=-1)
                v_sink_mean = self.v[i : i + 1, :sink_tokens].reshape(sink_size, frame_seqlen, -1).mean(1)
                v_new_mean = value[i : i + 1].reshape(1, frame_seqlen, -1).mean(1)
                v_cos_sim = torch.cosine_similarity(v_sink_mean, v_new_mean, dim=-1)
                avg_cos_sim = (k_cos_sim + v_cos_sim) / 2
                if avg_cos_sim.min() < self.policy.sink_threshold:
                    self.evict_idx[i].insert(0, (torch.argmin(avg_cos_sim).item() + 1) * frame_seqlen)
                    self.fired += 1
            if current_end > kv_cache_size or self.local_end[i] >= kv_cache_size:
                self.global_end[i], self.local_end[i] = c_start, kv_cache_size
                target_end = self.evict_idx[i][0]
                if cache_bs == 1 and self.current_step > 1:
                    self.current_step -= 1
                else:
                    popped = self.evict_idx[i].pop(0)
                    if popped > sink_tokens:
                        self.evict_idx[i].append(popped)
                    self.current_step = self.total_steps
                self.k[i : i + 1, target_end - num_new_tokens : target_end] = key[i : i + 1]
                self.v[i : i + 1, target_end - num_new_tokens : target_end] = value[i : i + 1]
                local_end = self.local_end[i]
            else:
                local_end = self.local_end[i] + current_end - self.global_end[i]
                rolling_end = current_end + num_new_tokens
                if sink_tokens < rolling_end <= kv_cache_size and (
                    not self.evict_idx[i] or self.evict_idx[i][-1] != rolling_end
                ):
                    self.evict_idx[i].append(rolling_end)
                self.k[i : i + 1, local_end - num_new_tokens : local_end] = key[i : i + 1]
                self.v[i : i + 1, local_end - num_new_tokens : local_end] = value[i : i + 1]
            self.global_end[i], self.local_end[i] = current_end, local_end


PORT_POLICIES = [
    CachePolicy(),
    CachePolicy(sink_threshold=0.5),
    CachePolicy(num_kv_cache=5, num_sink=2),
    CachePolicy(num_kv_cache=8, num_sink=1, sink_threshold=0.0),
]
PORT_IDS = ["default", "threshold-0.5", "5-frames-2-sinks", "8-frames-1-sink"]


def spread(g: torch.Generator, batch: int, num_frames: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random keys in a shared half-space: cosines over about [-0.3, 1], so the sink check fires now and then."""
    return (torch.randn(batch, num_frames * T, H, D, generator=g) + 0.3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("policy", PORT_POLICIES, ids=PORT_IDS)
def test_upstream_no_batch_repeated_steps_equal_the_port_write_by_write(policy, steps, dtype):
    """No-batch mode: each chunk's ``steps`` writes carry different keys (each step's own), and upstream checks the
    sinks at every one of them, its batch-1 ``current_step`` counter aiming every step at ``evict_idx[0]`` and popping
    at the last: the cache after every single write is the port's, bitwise, in fp32 and in bf16 (the check's
    precision is the cache dtype's, as upstream's)."""
    g = torch.Generator().manual_seed(1)
    port = UpstreamCachePort(policy, total_steps=steps, dtype=dtype)
    cache = KVCache(
        num_layers=1, batch_size=1, tokens_per_frame=T, num_heads=H, head_dim=D, policy=policy,
        compat="upstream", dtype=dtype, steps_per_chunk=steps,
    )  # fmt: skip
    start = 0
    fired_on_a_repeat = 0
    for chunk in range(24):
        num_frames = 2 if chunk == 0 else 1
        for step in range(steps):
            key, value = spread(g, 1, num_frames, dtype), spread(g, 1, num_frames, dtype)
            port.forward(key, value, [start * T])
            cache.write(0, key, value)
            cache.commit(step == steps - 1)
            assert torch.equal(cache.key[0], port.k) and torch.equal(cache.value[0], port.v), (chunk, step)
            fired_on_a_repeat += step > 0 and port.fired > 0
        start += num_frames
    assert fired_on_a_repeat  # the later steps' own checks were exercised


@pytest.mark.parametrize("steps", [2, 3, 4])
@pytest.mark.parametrize("policy", PORT_POLICIES, ids=PORT_IDS)
def test_upstream_stream_batch_with_warm_up_fillers_equals_the_port_call_by_call(policy, steps):
    """Stream batch as upstream runs it: ``prepare`` fills a batch-1 cache with the 2-frame first chunk (``steps``
    writes), then every call runs all ``steps`` slots, slot ``i`` one chunk behind slot ``i − 1``; while the pipeline
    fills, the slots without a real chunk run a filler at the first chunk's end (upstream's zeroed hidden states),
    writing and checking the sinks there. sdlive runs those fillers uncommitted (``commit`` flag False), so the real
    chunk rewrites the same frame slot next call: the caches after every call are the port's, bitwise."""
    g = torch.Generator().manual_seed(2)
    port = UpstreamCachePort(policy, total_steps=steps)
    one = KVCache(
        num_layers=1, batch_size=1, tokens_per_frame=T, num_heads=H, head_dim=D, policy=policy, compat="upstream"
    )
    for step in range(steps):  # prepare: the first chunk's steps, fill phase
        key, value = spread(g, 1, 2), spread(g, 1, 2)
        port.forward(key, value, [0])
        one.write(0, key, value)
        one.commit(step == steps - 1)
    port.repeat(steps)
    cache = one.repeat(steps)
    fired_on_a_filler = 0
    starts = [2 * T] * steps  # upstream's kv_cache_starts: the first chunk's end, for every slot
    for call in range(1, 20):
        starts = [(1 + call) * T] + starts[:-1]
        key, value = spread(g, steps, 1), spread(g, steps, 1)
        port.forward(key, value, starts)
        cache.write(0, key, value)
        cache.commit([i < call for i in range(steps)])  # slot i holds a real chunk from call i + 1 on
        assert torch.equal(cache.key[0], port.k) and torch.equal(cache.value[0], port.v), call
        fired_on_a_filler += call < steps and port.fired > 0
        for b in range(steps):
            assert cache.frame_position(b) * T == starts[b] + T if b < call else cache.frame_position(b) == 2
    if policy.num_sink > 2:  # the fillers' check finds sink frame 2 empty (similarity 0): the queue remembers it
        assert fired_on_a_filler
