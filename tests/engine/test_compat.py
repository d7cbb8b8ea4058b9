"""``compat`` on the engine: ``StreamEngine.load(..., compat="upstream" | "clean")`` reaches every session's KV caches
and VAE, is validated before loading, and both modes stream through ``StreamSession`` (stream batch and no batch)."""

from __future__ import annotations

import numpy as np
import pytest

from sdlive.daemon.engine import SessionParams, StreamEngine

W, H = 64, 48
FRAMES = 5 + 4 * 8  # 9 chunks: chunk 5 is the first write into a full 6-frame cache


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, StreamEngine]:
    import os

    os.environ.setdefault("SDLIVE_PROMPT_CACHE", str(tmp_path_factory.mktemp("prompts")))
    upstream = StreamEngine.load("tiny", device="cpu")  # the default
    return {"upstream": upstream, "clean": StreamEngine.load("tiny", device="cpu", compat="clean")}


def clip(frames: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(H, W, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 2 * i, axis=1) for i in range(frames)])


def params(**kw) -> SessionParams:
    return SessionParams(**{"prompt": "a watercolor painting", "steps": 2, "seed": 1, **kw})


def test_default_is_upstream_and_it_reaches_the_sessions_caches_and_vae(engines):
    assert engines["upstream"].compat == "upstream" and engines["clean"].compat == "clean"
    for compat, engine in engines.items():
        assert engine.new_kv_cache(batch_size=1, tokens_per_frame=4).compat == compat
        assert engine.new_vae().compat == compat
        session = engine.open_session(width=W, height=H, params=params())
        assert session._vae.compat == compat


def test_bad_compat_fails_before_loading(monkeypatch):
    import sdlive.daemon.model.bundle as bundle

    monkeypatch.setattr(bundle, "load_model_bundle", lambda *a, **k: pytest.fail("loaded despite a bad compat"))
    with pytest.raises(ValueError, match="compat must be one of 'upstream', 'clean', got 'strict'"):
        StreamEngine.load("tiny", device="cpu", compat="strict")  # type: ignore[arg-type]


@pytest.mark.parametrize(("steps", "stream_batch"), [(2, True), (2, False), (1, True)])
def test_both_modes_stream_every_frame_and_part_ways_once_the_cache_is_full(engines, steps, stream_batch):
    """Same input, seed and weights: both modes give every frame once, in order. They differ (the bf16-rounded decoder
    input from the first chunk; the third sink frame from chunk 5 on) but stay close: the same image, not another."""
    outs = {}
    for compat, engine in engines.items():
        session = engine.open_session(width=W, height=H, params=params(steps=steps, stream_batch=stream_batch))
        out = [f for frame in clip(FRAMES) for f in session.push(frame)] + session.flush()
        assert [f.index for f in out] == list(range(FRAMES))
        assert session.chunks == 9
        outs[compat] = np.stack([f.pixels for f in out]).astype(np.int16)
    diff = np.abs(outs["upstream"] - outs["clean"])
    # Chunks 1-4 (frames 5..20) differ by the decoder's bf16 rounding alone (the DiT's caches are the same); from
    # chunk 5 (frames 21..24) on the caches hold different third sinks and the DiT's x0 parts ways too.
    rounding_only, sinks_too = diff[5:21].mean(), diff[25:].mean()
    assert 0 < rounding_only < sinks_too
    assert diff.mean() < 1.0  # under one uint8 level on average: the same image


def test_upstream_session_queues_the_empty_sink_at_chunk_1_and_spends_it_at_chunk_5(engines):
    """No-batch mode, 1 step (one batch-1 cache). Upstream: after chunk 1 every block has sink frame 2 queued (it was
    empty when checked); at chunk 5, the first full-cache write, a block with only that in its queue overwrites sink
    frame 2 and leaves frame 3 and the round robin as they were. Clean: nothing is ever queued; a block whose round
    robin moved at chunk 5 overwrote frame 3 and kept frame 2. (The tiny model's random weights make some blocks'
    own checks fire too; those blocks are not asserted on.)"""
    for compat, engine in engines.items():
        session = engine.open_session(width=W, height=H, params=params(steps=1, stream_batch=False))
        frames = iter(clip(FRAMES))
        for _ in range(5 + 4):  # chunks 0 and 1
            session.push(next(frames))
        cache = session._seq_cache
        assert cache is not None and session.chunks == 2 and cache.num_cached_frames(0) == 3
        layers = range(cache.num_layers)
        assert [cache.sink_queue(layer, 0) for layer in layers] == [[2] if compat == "upstream" else []] * len(layers)
        for _ in range(4 * 3):  # chunks 2..4: the cache fills
            session.push(next(frames))
        assert session.chunks == 5 and cache.num_cached_frames(0) == 6
        before = [cache.key[layer][0].clone() for layer in layers]
        queues = [cache.sink_queue(layer, 0) for layer in layers]
        for _ in range(4):  # chunk 5
            session.push(next(frames))
        t = cache.tokens_per_frame
        checked = 0
        for layer in layers:
            frame2 = not cache.key[layer][0, 2 * t : 3 * t].equal(before[layer][2 * t : 3 * t])
            frame3 = not cache.key[layer][0, 3 * t : 4 * t].equal(before[layer][3 * t : 4 * t])
            if compat == "upstream":
                assert queues[layer] and queues[layer][-1] == 2  # chunk 1's choice waits at the back
                if queues[layer] == [2] and cache.sink_queue(layer, 0) == []:
                    assert frame2 and not frame3 and cache.ring_order(layer, 0) == [3, 4, 5]
                    checked += 1
            else:
                assert cache.sink_queue(layer, 0) == []
                if cache.ring_order(layer, 0) == [4, 5, 3]:
                    assert frame3 and not frame2
                    checked += 1
        assert checked >= 1, compat


def test_upstream_with_a_three_frame_cache_fails_before_loading(monkeypatch):
    import sdlive.daemon.model.bundle as bundle

    monkeypatch.setattr(bundle, "load_model_bundle", lambda *a, **k: pytest.fail("loaded despite a bad setting"))
    with pytest.raises(ValueError, match="compat='upstream'.*num_kv_cache >= 4"):
        StreamEngine.load("tiny", device="cpu", cache_policy={"num_kv_cache": 3, "num_sink": 1})


@pytest.mark.parametrize("steps", [2, 3])
def test_upstream_stream_batch_runs_every_slot_from_the_first_call(engines, steps):
    """Upstream runs all ``steps`` slots of the stream batch from its first call, the slots without a real chunk on
    zeroed hidden states: their KV caches take a filler frame at frame slot 2 and their sink check sees sink frame 2
    empty and queues it. sdlive does the same uncommitted (position unchanged: the real chunk rewrites that frame
    next call) with ``compat="upstream"``; ``"clean"`` leaves those slots alone. Both give every frame once."""
    for compat, engine in engines.items():
        session = engine.open_session(width=W, height=H, params=params(steps=steps, stream_batch=True))
        frames = iter(clip(FRAMES))
        out = []
        for _ in range(5):  # chunk 0: all steps on one cache, then one copy per step level
            out += session.push(next(frames))
        cache = session._batch_cache
        assert cache is not None and cache.batch_size == steps
        t, layers = cache.tokens_per_frame, range(cache.num_layers)
        before = [cache.key[layer].clone() for layer in layers]
        for _ in range(4):  # chunk 1: the first stream-batch call
            out += session.push(next(frames))
        assert cache.frame_position(0) == 3
        for b in range(1, steps):
            wrote = [not cache.key[layer][b, 2 * t : 3 * t].equal(before[layer][b, 2 * t : 3 * t]) for layer in layers]
            assert all(wrote) if compat == "upstream" else not any(wrote), (compat, b)
            assert cache.frame_position(b) == 2
            queued = [2 in cache.sink_queue(layer, b) for layer in layers]
            assert all(queued) if compat == "upstream" else not any(queued)
        out += [f for frame in frames for f in session.push(frame)] + session.flush()
        assert [f.index for f in out] == list(range(FRAMES))  # no filler ever decoded


def test_no_batch_cache_counts_the_steps_as_upstreams_current_step(engines):
    session = engines["upstream"].open_session(width=W, height=H, params=params(steps=3, stream_batch=False))
    for frame in clip(9):
        session.push(frame)
    assert session._seq_cache is not None and session._seq_cache.steps_per_chunk == 3
    session.set_params(steps=2)
    session.push(clip(1)[0])
    assert session._seq_cache.steps_per_chunk == 2
