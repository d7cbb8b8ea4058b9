"""Session batching: sessions whose chunks share one DiT forward (``engine.batch.run_together``) give the frames the
same sessions give run one by one (tiny weights, same seeds and inputs), within float tolerance: sessions opened at
different times (other RoPE positions and cache fills), another prompt, a preset switch and a step change."""

from __future__ import annotations

import numpy as np
import pytest

from sdlive.daemon.engine import SessionParams, StreamEngine
from sdlive.daemon.engine.batch import GroupTiming, run_together

W, H = 64, 48
FRAMES = 37


@pytest.fixture(scope="module", params=["upstream", "clean"])
def engine(request) -> StreamEngine:
    return StreamEngine.load("tiny", device="cpu", compat=request.param)


def clip(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(H, W, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 3 * i, axis=1) for i in range(FRAMES)])


# session: (params, the input frame index at which it opens)
PLAN = {
    "a": (dict(prompt="a watercolor painting", steps=2, seed=1), 0),
    "b": (dict(prompt="an oil painting", steps=2, seed=2), 4),  # opens a chunk later: other positions and fill
    "c": (dict(prompt="a watercolor painting", steps=3, seed=3, stream_batch=False), 8),  # no-batch, 3 steps
}
# (frame index of session a, session, change): a preset switch with a blend, a step change, a mode change
CHANGES = [
    (13, "a", dict(prompt="an oil painting", transition_chunks=2)),
    (17, "b", dict(steps=3)),
    (21, "c", dict(steps=2, stream_batch=True)),
    (25, "a", dict(steps=1)),
]


def stream(engine: StreamEngine, *, batched: bool) -> tuple[dict[str, list], list[GroupTiming]]:
    sessions = {}
    inputs = {name: clip(i) for i, name in enumerate(PLAN)}
    outputs: dict[str, list] = {name: [] for name in PLAN}
    timings: list[GroupTiming] = []
    for tick in range(FRAMES):
        for name, (p, opens) in PLAN.items():
            if tick == opens:
                sessions[name] = engine.open_session(width=W, height=H, params=SessionParams(**p))
        for at, name, change in CHANGES:
            if tick == at:
                sessions[name].set_params(**change)
        live = [n for n, (_, opens) in PLAN.items() if tick >= opens]
        steps = [sessions[n].push_steps(inputs[n][tick - PLAN[n][1]]) for n in live]
        results = run_together(engine, steps, batch=batched, on_forward=timings.append)
        for name, result in zip(live, results, strict=True):
            assert not isinstance(result, BaseException), result
            outputs[name].extend(result)
    for name, session in sessions.items():
        outputs[name].extend(session.flush())
    return outputs, timings


def test_batched_sessions_give_the_frames_of_the_same_sessions_run_one_by_one(engine):
    alone, alone_timings = stream(engine, batched=False)
    together, timings = stream(engine, batched=True)
    assert all(t.members == 1 for t in alone_timings)
    assert max(t.members for t in timings) == 3, "the three sessions never shared a forward"
    assert len(timings) < len(alone_timings)
    for name in PLAN:
        a, b = alone[name], together[name]
        assert [o.index for o in a] == [o.index for o in b] == list(range(FRAMES - PLAN[name][1]))
        diff = np.abs(np.stack([o.pixels for o in a]).astype(int) - np.stack([o.pixels for o in b]).astype(int))
        assert diff.max() <= 2, f"session {name}: batched frames differ by up to {diff.max()} levels"
        assert diff.mean() < 0.05, f"session {name}: mean difference {diff.mean():.3f}"


def test_the_reference_itself_is_one_by_one_push(engine):
    """``run_together(batch=False)`` is the plain ``push``: the reference above is the sessions run alone."""
    frames = clip(5)
    p = SessionParams(prompt="a watercolor painting", steps=2, seed=4)
    s1 = engine.open_session(width=W, height=H, params=p)
    plain = [o for f in frames for o in s1.push(f)]
    s2 = engine.open_session(width=W, height=H, params=p)
    driven = [o for f in frames for o in run_together(engine, [s2.push_steps(f)], batch=False)[0]]
    assert [o.index for o in plain] == [o.index for o in driven]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(plain, driven, strict=True))


def test_a_bad_frame_fails_only_its_own_session(engine):
    p = SessionParams(prompt="a watercolor painting", steps=2, seed=4)
    good = engine.open_session(width=W, height=H, params=p)
    bad = engine.open_session(width=W, height=H, params=p)
    results = run_together(engine, [good.push_steps(clip(0)[0]), bad.push_steps(np.zeros((2, 2, 3), np.uint8))])
    assert results[0] == []
    assert isinstance(results[1], ValueError)
    assert good.frames_in == 1 and bad.frames_in == 0


def test_measure_sessions_reports_throughput_and_latency_with_and_without_batching(engine):
    from sdlive.daemon.engine.scale import measure_sessions

    alone = measure_sessions(engine, n=2, batched=False, width=W, height=H, frames=8, warmup_frames=9)
    together = measure_sessions(engine, n=2, batched=True, width=W, height=H, frames=8, warmup_frames=9)
    for figures in (alone, together):
        assert figures.frames == 2 * 8 and figures.fps > 0
        assert 0 < figures.p50_ms <= figures.p99_ms
    assert alone.shared_forwards == 0 and alone.forwards == 2 * together.forwards
    assert together.shared_forwards == together.forwards > 0
    assert set(together.as_dict()) >= {"n", "fps", "p99_ms"}
