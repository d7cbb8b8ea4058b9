"""The pipeline over ranks (gloo on the CPU, ranks as real processes) gives the frames a single process gives for
the same weights, seed and input, through what a stream lives through: a preset switch, a step change, a second
session, a rebalance that moves blocks with their caches; and a rank that dies ends it with a clear error."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from sdlive.daemon.distributed.launch import start_pipeline
from sdlive.daemon.distributed.partition import balance, even_split
from sdlive.daemon.distributed.ring import RankFailure
from sdlive.daemon.engine import StreamEngine
from sdlive.daemon.protocol.params import GenerationParams

pytestmark = pytest.mark.slow

SIZE = 64
LOAD = {"model": "tiny"}  # tiny's weights come from its spec's seed: the same on every rank


def frames(count: int, seed: int) -> list[np.ndarray]:
    """A moving gradient with noise: frames differ, so the noise controller sees motion."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    out = []
    for i in range(count):
        base = ((x + 2 * y + 5 * i) % 256).astype(np.int16)
        noisy = base[..., None] + rng.integers(-20, 20, (SIZE, SIZE, 3))
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return out


def scenario(engine, rebalance=None) -> dict[str, list[np.ndarray]]:
    """Two sessions through a preset switch, a step change and a mode change, with ``rebalance()`` between two
    pushes when given. Returns every output frame per session, in order."""
    a = engine.open_session(width=SIZE, height=SIZE, params=GenerationParams(prompt="a fox", steps=2, seed=1))
    out: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    first, second = frames(40, 0), frames(30, 1)
    for i, frame in enumerate(first):
        if i == 9:
            a.set_params(prompt="a castle", transition_chunks=2)  # a preset switch, blended
        if i == 13 and rebalance is not None:
            rebalance()
        if i == 17:
            a.set_params(steps=3)  # a step change drains the pipeline, the caches follow
        if i == 25:
            a.set_params(stream_batch=False)  # the SLO fallback's switch
        out["a"] += [f.pixels for f in a.push(frame)]
        if i == 10:
            b = engine.open_session(width=SIZE, height=SIZE, params=GenerationParams(prompt="a fox", steps=1, seed=2),
                                    pixel_format="bgra")
        if i >= 10:
            bgra = np.concatenate([second[i - 10][..., ::-1], np.full((SIZE, SIZE, 1), 255, np.uint8)], axis=-1)
            out["b"] += [f.pixels for f in b.push(np.ascontiguousarray(bgra))]
    out["a"] += [f.pixels for f in a.flush()]
    out["b"] += [f.pixels for f in b.flush()]
    for session in (a, b):
        close = getattr(session, "close", None)
        if close is not None:
            close()
    return out


@pytest.fixture(scope="module")
def reference():
    return scenario(StreamEngine.load("tiny", device="cpu"))


def assert_same_frames(got, want):
    for name in want:
        assert len(got[name]) == len(want[name]), f"session {name}: {len(got[name])} frames, single process: {len(want[name])}"
        worst = max(int(np.abs(g.astype(np.int16) - w.astype(np.int16)).max()) for g, w in zip(got[name], want[name], strict=True))
        assert worst <= 1, f"session {name}: a frame differs from the single-process one by {worst} levels"


@pytest.mark.parametrize("world", [2, 3])
def test_pipeline_frames_equal_single_process_through_switches_and_a_rebalance(world, reference):
    engine = start_pipeline(LOAD, world, rebalance="off")
    try:
        assert engine.ranges == even_split(4, world)
        # tiny has 4 blocks: move them so that every rank's range changes, caches included
        target = [range(0, 1), range(1, 4)] if world == 2 else [range(0, 2), range(2, 3), range(3, 4)]
        got = scenario(engine, rebalance=lambda: engine.rebalance(target))
        assert engine.ranges == target
    finally:
        engine.close()
    assert_same_frames(got, reference)
    assert all(proc.wait(20) == 0 for proc in engine.workers), "every rank stops cleanly when told"


def test_a_rank_that_dies_ends_the_pipeline_with_a_clear_error_not_a_hang():
    engine = start_pipeline(LOAD, 2, rebalance="off")
    try:
        session = engine.open_session(width=SIZE, height=SIZE, params=GenerationParams(prompt="a fox", steps=2))
        stream = frames(12, 3)
        for frame in stream[:6]:
            session.push(frame)
        victim = engine.workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        started = time.monotonic()
        with pytest.raises(RankFailure, match=r"rank 1 \(pid \d+\) exited with code -9|rank 1"):
            for frame in stream[6:]:
                session.push(frame)
        assert time.monotonic() - started < 30
    finally:
        engine.close()


def test_the_balanced_split_moves_blocks_from_slow_ranks_to_fast_ones():
    # rank 0 also runs the VAE (12 ms a forward outside its blocks): it gets fewer blocks
    assert balance([1.0, 1.0], [12.0, 0.0], 40) == [range(0, 14), range(14, 40)]
    # a GPU twice as slow per block gets half the blocks of the others
    assert balance([1.0, 2.0, 1.0], [0.0, 0.0, 0.0], 40) == [range(0, 16), range(16, 24), range(24, 40)]
    # every rank keeps a block, however slow
    assert [len(r) for r in balance([1.0, 1000.0], [0.0, 0.0], 4)] == [3, 1]
    assert even_split(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    with pytest.raises(ValueError, match="at most one rank per block"):
        even_split(2, 3)
