"""KVCache bookkeeping on crafted keys/values: fill, round-robin eviction, sinks, sink refresh, RoPE refresh,
uncommitted rewrites, per-slot commits, repeat/select.

Frames are tagged: every token of a "frame with id n" carries key = value = n in channel 0, so which frame sits in
which cache slot can be read back. Similarity tests use direction vectors instead.
"""

from __future__ import annotations

import pytest
import torch

from sdlive.daemon.model.configs import Compat
from sdlive.daemon.model.kv_cache import CachePolicy, KVCache

T, H, D = 3, 2, 4  # tokens per frame, heads, head dim


def make_cache(
    *, num_layers: int = 2, batch_size: int = 1, dtype: torch.dtype = torch.float32, compat: Compat = "upstream",
    **policy,
) -> KVCache:
    """A small cache; ``policy`` overrides fields of the test policy (sink refresh off unless given)."""
    return KVCache(
        num_layers=num_layers, batch_size=batch_size, tokens_per_frame=T, num_heads=H, head_dim=D,
        policy=CachePolicy(**{"sink_threshold": -1.0, **policy}), dtype=dtype, compat=compat,
    )  # fmt: skip


def tagged(*frame_ids: float, batch: int = 1) -> torch.Tensor:
    """[batch, F*T, H, D] with channel 0 = the frame id (per sample: id + 100*b, so slots differ)."""
    x = torch.zeros(batch, len(frame_ids) * T, H, D)
    for f, fid in enumerate(frame_ids):
        for b in range(batch):
            x[b, f * T : (f + 1) * T, :, 0] = fid + 100 * b
            x[b, f * T : (f + 1) * T, :, 1] = 1.0  # keep every frame a non-zero vector
    return x


def directed(vec: list[float], batch: int = 1) -> torch.Tensor:
    """One frame [batch, T, H, D] whose every token (in every head) is ``vec``: its mean is ``vec``."""
    return torch.tensor(vec, dtype=torch.float32).expand(batch, T, H, D).clone()


def push(cache: KVCache, key: torch.Tensor, value: torch.Tensor | None = None, commit=True):
    """Write one chunk into every block (as forward_stream does) and commit it; returns block 0's view."""
    value = key if value is None else value
    out = [cache.write(layer, key, value) for layer in range(cache.num_layers)]
    cache.commit(commit)
    return out[0]


def slot_ids(cache: KVCache, layer: int = 0, b: int = 0) -> list[float]:
    """The frame id stored in each of the cache's frame slots (channel 0 of the slot's first token)."""
    return [cache.key[layer][b, s * T, 0, 0].item() - 100 * b for s in range(cache.num_kv_cache)]


def test_fill_phase_appends_chunks_and_attends_over_cache_and_chunk():
    cache = make_cache()
    keys, values, lengths = push(cache, tagged(0, 1))  # first chunk: 2 latent frames
    assert keys.shape == (1, 2 * T, H, D) and lengths is None
    assert torch.equal(keys, tagged(0, 1)) and torch.equal(values, tagged(0, 1))
    assert cache.num_cached_frames(0) == 2 and cache.frame_position(0) == 2
    for fid in (2, 3, 4, 5):
        keys, _, _ = push(cache, tagged(fid))
        assert keys.shape[1] == (fid + 1) * T  # [cache ∪ chunk]
    assert slot_ids(cache)[:6] == [0, 1, 2, 3, 4, 5]
    assert cache.num_cached_frames(0) == 6 and cache.frame_position(0) == 6
    assert cache.ring_order(0, 0) == [3, 4, 5]


def test_full_phase_overwrites_non_sinks_round_robin_and_keeps_sinks():
    cache = make_cache()
    push(cache, tagged(0, 1))
    for fid in range(2, 6):
        push(cache, tagged(fid))
    expected = {6: [0, 1, 2, 6, 4, 5], 7: [0, 1, 2, 6, 7, 5], 8: [0, 1, 2, 6, 7, 8], 9: [0, 1, 2, 9, 7, 8]}
    for fid, slots in expected.items():
        keys, _, lengths = push(cache, tagged(fid))
        assert slot_ids(cache) == slots, fid
        assert slot_ids(cache, layer=1) == slots
        assert keys.shape[1] == 6 * T and lengths is None  # the whole buffer, the new frame included
        assert cache.num_cached_frames(0) == 6 and cache.frame_position(0) == fid + 1
    assert cache.ring_order(0, 0) == [4, 5, 3]


def test_two_frame_chunk_into_almost_full_cache_appends_then_evicts_oldest_non_sink():
    # clean: a 2-frame chunk into a full cache never comes in a stream; upstream's rule would write both frames
    # ending at its queue's front.
    cache = make_cache(compat="clean")
    push(cache, tagged(0, 1))
    for fid in (2, 3, 4):
        push(cache, tagged(fid))
    push(cache, tagged(5, 6))  # slot 5 is free, frame 6 evicts the oldest non-sink (slot 3)
    assert slot_ids(cache) == [0, 1, 2, 6, 4, 5]
    assert cache.ring_order(0, 0) == [4, 5, 3]


SINK_DIRS = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]


def full_cache_with_direction_sinks(threshold: float) -> KVCache:
    """A full cache whose 3 sink frames point along e0, e1, e2 (keys and values), non-sinks along e3.

    ``compat="clean"``: the sink check only in the full phase, so these tests see the full-phase rule alone (with
    ``"upstream"`` the fill-phase writes along e2 / e3, orthogonal to the sinks, would queue sink refreshes: see
    ``test_kv_cache_compat.py``)."""
    cache = make_cache(sink_threshold=threshold, compat="clean")
    push(cache, torch.cat([directed(SINK_DIRS[0]), directed(SINK_DIRS[1])], dim=1))
    push(cache, directed(SINK_DIRS[2]))
    for _ in range(3):
        push(cache, directed([0, 0, 0, 1.0]))
    assert cache.num_cached_frames(0) == 6
    return cache


def sink_contents(cache: KVCache, layer: int = 0) -> torch.Tensor:
    """[3, D]: the first token's key (head 0) of each sink frame."""
    return cache.key[layer][0, 0 : 3 * T : T, 0]


@pytest.mark.parametrize(
    ("new", "replaced"),
    [
        ([0.8, 0.55, 0.1, 0.2], 2),  # cosines ≈ 0.80 / 0.55 / 0.10 -> sink 2 is the least similar, < 0.2
        ([0.1, 0.9, 0.35, 0.2], 0),  # cosines ≈ 0.10 / 0.90 / 0.35 -> sink 0
    ],
)
def test_sink_refresh_replaces_least_similar_sink_below_threshold(new, replaced):
    cache = full_cache_with_direction_sinks(threshold=0.2)
    ring_before = cache.ring_order(0, 0)
    frame = directed(new)
    push(cache, frame)
    expected = torch.tensor(SINK_DIRS)
    expected[replaced] = frame[0, 0, 0]
    assert torch.equal(sink_contents(cache), expected)
    assert cache.ring_order(0, 0) == ring_before  # the round-robin does not advance on a refresh
    assert cache.frame_position(0) == 7


def test_sink_refresh_off_with_threshold_minus_one():
    cache = full_cache_with_direction_sinks(threshold=-1.0)
    push(cache, directed([0.8, 0.55, 0.1, 0.2]))
    assert torch.equal(sink_contents(cache), torch.tensor(SINK_DIRS))
    assert cache.key[0][0, 3 * T, 0].tolist() == pytest.approx([0.8, 0.55, 0.1, 0.2])  # oldest non-sink slot


def test_sink_refresh_not_triggered_when_every_sink_is_similar_enough():
    cache = full_cache_with_direction_sinks(threshold=0.2)
    push(cache, directed([0.6, 0.5, 0.45, 0.2]))  # every cosine >= 0.45
    assert torch.equal(sink_contents(cache), torch.tensor(SINK_DIRS))


def test_sink_refresh_averages_key_and_value_similarity():
    cache = full_cache_with_direction_sinks(threshold=0.2)
    # Keys dissimilar to sink 2 (cos ≈ 0.1) but values identical to it (cos = 1): avg ≈ 0.55, no refresh.
    push(cache, directed([0.8, 0.55, 0.1, 0.2]), directed(SINK_DIRS[2]))
    assert torch.equal(sink_contents(cache), torch.tensor(SINK_DIRS))
    # Both dissimilar: refresh.
    push(cache, directed([0.8, 0.55, 0.1, 0.2]), directed([0.8, 0.55, 0.1, 0.2]))
    assert sink_contents(cache)[2].tolist() == pytest.approx([0.8, 0.55, 0.1, 0.2])


def test_sink_refresh_decided_per_block():
    cache = full_cache_with_direction_sinks(threshold=0.2)
    frame = directed([0.8, 0.55, 0.1, 0.2])
    cache.write(0, frame, frame)  # block 0: dissimilar -> refresh sink 2
    similar = directed([0.6, 0.5, 0.45, 0.2])
    cache.write(1, similar, similar)  # block 1: similar to every sink -> round robin
    cache.commit()
    assert sink_contents(cache, layer=0)[2].tolist() == pytest.approx([0.8, 0.55, 0.1, 0.2])
    assert torch.equal(sink_contents(cache, layer=1), torch.tensor(SINK_DIRS))
    assert cache.ring_order(0, 0) == [3, 4, 5] and cache.ring_order(1, 0) == [4, 5, 3]


def test_rope_position_resets_to_num_kv_cache_minus_one_at_50():
    cache = make_cache()
    push(cache, tagged(0, 1))
    positions = [cache.frame_position(0)]
    for fid in range(2, 53):
        push(cache, tagged(fid))
        positions.append(cache.frame_position(0))
    assert positions == list(range(2, 50)) + [5, 6, 7, 8]  # reaching 50 resets to num_kv_cache - 1


def test_rope_refresh_zero_disables_reset():
    cache = make_cache(rope_refresh_frames=0, num_layers=1)
    push(cache, tagged(0, 1))
    for fid in range(2, 60):
        push(cache, tagged(fid))
    assert cache.frame_position(0) == 60


def test_uncommitted_chunk_rewrites_the_same_slot():
    # clean's rule; upstream's repeats follow its step counter (test_kv_cache_compat.py).
    cache = make_cache(compat="clean")
    push(cache, tagged(0, 1))
    push(cache, tagged(2), commit=False)  # fill phase
    push(cache, tagged(20), commit=False)
    keys, _, _ = push(cache, tagged(200))
    assert keys.shape[1] == 3 * T
    assert slot_ids(cache)[:3] == [0, 1, 200] and cache.frame_position(0) == 3 and cache.num_cached_frames(0) == 3
    for fid in (3, 4, 5):
        push(cache, tagged(fid))
    for step_id in (60, 61, 62):  # full phase: n steps of frame 6 hit one slot, rotate once
        push(cache, tagged(step_id), commit=False)
        assert slot_ids(cache) == [0, 1, 200, step_id, 4, 5]
        assert cache.ring_order(0, 0) == [3, 4, 5] and cache.frame_position(0) == 6
    push(cache, tagged(63))
    assert slot_ids(cache) == [0, 1, 200, 63, 4, 5] and cache.ring_order(0, 0) == [4, 5, 3]
    assert cache.frame_position(0) == 7


def test_uncommitted_chunk_keeps_its_sink_refresh_decision():
    cache = full_cache_with_direction_sinks(threshold=0.2)
    dissimilar = directed([0.8, 0.55, 0.1, 0.2])
    push(cache, dissimilar, commit=False)  # refreshes sink 2
    # Sink 2 now holds this very frame (similar): a fresh decision would pick the round robin instead.
    push(cache, dissimilar * 2, commit=False)
    push(cache, dissimilar * 3)
    assert sink_contents(cache)[2].tolist() == pytest.approx([2.4, 1.65, 0.3, 0.6])
    assert cache.key[0][0, 3 * T, 0].tolist() == [0.0, 0.0, 0.0, 1.0]  # the round-robin slot was never touched


def test_chunk_size_change_while_uncommitted_is_an_error():
    cache = make_cache()
    push(cache, tagged(0, 1), commit=False)
    with pytest.raises(ValueError, match="uncommitted"):
        cache.write(0, tagged(5), tagged(5))


def test_per_slot_commit_and_positions_give_per_slot_lengths():
    # clean: an uncommitted frame is not counted; upstream counts what it wrote (its local_end).
    cache = make_cache(batch_size=2, compat="clean")
    push(cache, tagged(0, 1, batch=2))
    push(cache, tagged(2, batch=2), commit=[True, False])
    assert cache.frame_positions() == [3, 2] and [cache.num_cached_frames(b) for b in (0, 1)] == [3, 2]
    keys, values, lengths = cache.write(0, tagged(3, batch=2), tagged(3, batch=2))
    assert keys.shape[1] == 4 * T
    assert lengths == [4 * T, 3 * T]
    assert slot_ids(cache, b=0)[:4] == [0, 1, 2, 3] and slot_ids(cache, b=1)[:3] == [0, 1, 3]


def test_repeat_copies_a_batch1_cache_into_independent_slots():
    cache = make_cache()
    push(cache, tagged(0, 1))
    push(cache, tagged(2))
    batch = cache.repeat(3)
    assert batch.batch_size == 3 and batch.frame_positions() == [3, 3, 3]
    assert all(torch.equal(batch.key[layer][b], cache.key[layer][0]) for layer in range(2) for b in range(3))
    push(batch, tagged(3, batch=3), commit=[True, False, False])
    assert batch.frame_positions() == [4, 3, 3] and cache.frame_position(0) == 3
    assert slot_ids(cache) == [0, 1, 2, 0, 0, 0]  # the source is untouched
    assert slot_ids(batch, b=0) == [0, 1, 2, 3, 0, 0]
    assert batch.key[0].data_ptr() != cache.key[0].data_ptr()
    with pytest.raises(ValueError, match="batch-1"):
        batch.repeat(2)


def test_select_gives_a_batch1_copy_of_one_slot():
    cache = make_cache(batch_size=2)
    push(cache, tagged(0, 1, batch=2))
    push(cache, tagged(2, batch=2), commit=[False, True])
    with pytest.raises(RuntimeError, match="uncommitted"):
        cache.select(1)
    push(cache, tagged(7, batch=2))  # slot 0 rewrites its pending frame 2 as 7; slot 1 appends 7
    one = cache.select(1)
    assert one.batch_size == 1 and one.frame_position(0) == 4 and one.num_cached_frames(0) == 4
    assert slot_ids(cache, b=0)[:3] == [0, 1, 7] and slot_ids(cache, b=1)[:4] == [0, 1, 2, 7]
    assert torch.equal(one.key[1][0], cache.key[1][1])
    push(one, tagged(9))
    assert cache.frame_position(1) == 4 and one.frame_position(0) == 5  # the source is untouched
    with pytest.raises(IndexError):
        cache.select(2)


def test_reset_forgets_frames_and_positions():
    cache = make_cache()
    push(cache, tagged(0, 1))
    push(cache, tagged(2))
    cache.reset()
    assert cache.frame_position(0) == 0 and cache.num_cached_frames(0) == 0 and cache.ring_order(0, 0) == []
    keys, _, _ = push(cache, tagged(0, 1))
    assert keys.shape[1] == 2 * T


def test_nbytes_counts_both_tensors_of_every_block():
    cache = make_cache(num_layers=3, batch_size=2, dtype=torch.bfloat16)
    assert cache.nbytes == 3 * 2 * (2 * 6 * T * H * D) * 2


def test_invalid_configuration_and_chunks_are_rejected():
    with pytest.raises(ValueError):
        make_cache(num_sink=6)
    with pytest.raises(ValueError):
        make_cache(rope_refresh_frames=3)
    cache = make_cache()
    with pytest.raises(ValueError, match="whole number"):
        cache.write(0, torch.zeros(1, T + 1, H, D), torch.zeros(1, T + 1, H, D))
    with pytest.raises(ValueError, match="non-sink"):
        cache.write(0, tagged(0, 1, 2, 3), tagged(0, 1, 2, 3))
