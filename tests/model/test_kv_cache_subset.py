"""KVCache.subset: a part of the slots as a cache of its own, sharing storage and writing its bookkeeping back."""

import pytest
import torch

from sdlive.daemon.model.configs import Compat
from sdlive.daemon.model.kv_cache import CachePolicy, KVCache

T = 4  # tokens per frame


def cache(batch: int = 3, compat: Compat = "clean") -> KVCache:
    """``compat="clean"`` unless asked: with ``"upstream"`` the first write finds the sink frame empty and queues it
    for the first full-cache write (tested below), which would hide the round robin these tests follow."""
    return KVCache(
        num_layers=2, batch_size=batch, tokens_per_frame=T, num_heads=1, head_dim=2,
        policy=CachePolicy(num_kv_cache=4, num_sink=1), compat=compat,
    )


def chunk(batch: int, value: float) -> torch.Tensor:
    return torch.full((batch, T, 1, 2), value)


def write_chunk(c: KVCache, value: float, commit=True) -> None:
    for layer in range(c.num_layers):
        c.write(layer, chunk(c.batch_size, value), chunk(c.batch_size, -value))
    c.commit(commit)


def test_writes_through_a_subset_land_in_the_parent_and_only_in_its_slots():
    c = cache()
    with c.subset(0, 2) as view:
        assert view.batch_size == 2
        write_chunk(view, 5.0)
    assert c.num_cached_frames(0) == c.num_cached_frames(1) == 1
    assert c.num_cached_frames(2) == 0
    assert c.frame_positions() == [1, 1, 0]
    assert (c.key[0][:2, :T] == 5.0).all() and (c.value[1][:2, :T] == -5.0).all()
    assert (c.key[0][2] == 0).all()  # the slot outside the subset was not touched


def test_a_single_slot_subset_continues_that_slots_ring():
    c = cache(2)
    for v in (1.0, 2.0, 3.0, 4.0):  # fill all 4 frames of both slots
        write_chunk(c, v)
    with c.subset(1, 2) as view:
        assert view.frame_positions() == [4]
        write_chunk(view, 9.0)  # full phase: overwrites slot 1's oldest non-sink frame (frame slot 1)
    assert c.frame_positions() == [4, 5]
    assert (c.key[0][1, T : 2 * T] == 9.0).all()
    assert (c.key[0][0, T : 2 * T] == 2.0).all()
    assert c.ring_order(0, 1) == [2, 3, 1]
    assert c.ring_order(0, 0) == [1, 2, 3]


def test_a_single_slot_subset_carries_that_slots_sink_queue():
    c = cache(2, compat="upstream")
    for v in (1.0, 2.0, 3.0, 4.0):  # the first write sees sink frame 0 empty (similarity 0 < 0.2): queued
        write_chunk(c, v)
    assert c.sink_queue(0, 0) == c.sink_queue(0, 1) == [0] and c.sink_queue(1, 1) == [0]
    with c.subset(1, 2) as view:
        assert view.sink_queue(0, 0) == [0]
        write_chunk(view, 9.0)  # the first full-cache write takes the queued sink frame
    assert (c.key[0][1, :T] == 9.0).all() and (c.key[0][1, T : 2 * T] == 2.0).all()
    assert (c.key[0][0, :T] == 1.0).all()
    assert c.sink_queue(0, 1) == c.sink_queue(1, 1) == [] and c.sink_queue(0, 0) == [0]
    assert c.ring_order(0, 1) == c.ring_order(0, 0) == [1, 2, 3]  # a sink refresh leaves the round robin


def test_an_uncommitted_chunk_in_a_subset_stays_in_flight_in_the_parent():
    c = cache(2)
    with c.subset(0, 1) as view:
        write_chunk(view, 1.0, commit=False)
    assert c.frame_positions() == [0, 0]
    with c.subset(0, 1) as view:
        write_chunk(view, 2.0, commit=True)  # rewrites the same frame slot, then commits
    assert c.frame_positions() == [1, 0] and c.num_cached_frames(0) == 1
    assert (c.key[0][0, :T] == 2.0).all()


@pytest.mark.parametrize("start,stop", [(0, 0), (2, 1), (0, 4), (-1, 1)])
def test_out_of_range_subsets_are_refused(start, stop):
    with pytest.raises(IndexError, match="out of range"):
        with cache().subset(start, stop):
            pass
