"""Throughput and latency of several sessions on one engine, with and without session batching, and of one session
on any engine (a pipeline over ranks included) (``bench/scale.py``).

:func:`measure_sessions` opens ``n`` sessions of one size at once and pushes frames into all of them in lockstep, as
fast as the engine goes, through :func:`~.batch.run_together` (``batched=False``: every forward alone, the same
work in the same order). It reports the frames restyled per second over all sessions and the latency of each
frame, from its push to its output being ready (the wait for the rest of its chunk and the stream-batch pipeline
included), after a warm-up that fills the caches and the pipeline.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from ..protocol.params import GenerationParams
from .batch import GroupTiming, run_together
from .engine import StreamEngine
from .interface import Engine

__all__ = ["SessionsFigures", "StreamFigures", "measure_sessions", "measure_stream"]


@dataclass
class StreamFigures:
    """What :func:`measure_stream` measured; :meth:`as_dict` gives ``{fps, p99_ms, …}`` for JSON."""

    fps: float
    """Output frames per second (all sessions together)."""
    p50_ms: float
    p99_ms: float
    frames: int
    """Output frames released while measuring (after the warm-up)."""
    width: int
    height: int
    steps: int
    stream_batch: bool
    device: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class SessionsFigures(StreamFigures):
    """What :func:`measure_sessions` measured: :class:`StreamFigures` over ``n`` sessions, and the forwards."""

    n: int = 1
    batched: bool = False
    forwards: int = 0
    """DiT forwards run while measuring."""
    shared_forwards: int = 0
    """Of those, forwards that served more than one session."""


def _rate_and_latency(outputs: int, elapsed: float, latencies: list[float]) -> dict[str, float]:
    """fps and the p50/p99 latency (ms) of a measured window, as both figures report them."""
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    return {
        "fps": round(outputs / elapsed, 2) if elapsed > 0 else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
    }


def measure_sessions(
    engine: StreamEngine,
    *,
    n: int,
    batched: bool,
    width: int = 64,
    height: int = 64,
    steps: int = 2,
    stream_batch: bool = True,
    frames: int = 41,
    warmup_frames: int = 13,
    prompt: str = "a watercolor painting",
    seed: int = 0,
) -> SessionsFigures:
    """Open ``n`` sessions (seeds ``seed .. seed + n - 1``) and push ``warmup_frames + frames`` frames into each in
    lockstep; measure while the last ``frames`` are pushed (module docstring). The sessions are closed (dropped) afterwards."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if frames < 4:
        raise ValueError(f"frames must be >= 4 (one chunk), got {frames}")
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    clip = [np.roll(base, 2 * i, axis=1) for i in range(warmup_frames + frames)]
    sessions = [
        engine.open_session(
            width=width, height=height,
            params=GenerationParams(prompt=prompt, steps=steps, stream_batch=stream_batch, seed=seed + i),
        )
        for i in range(n)
    ]  # fmt: skip
    timings: list[GroupTiming] = []
    pushed_at: list[dict[int, float]] = [{} for _ in range(n)]
    latencies: list[float] = []
    outputs = 0
    started = 0.0
    for index, frame in enumerate(clip):
        measuring = index >= warmup_frames
        if index == warmup_frames:
            started = time.perf_counter()
            timings.clear()
        now = time.perf_counter()
        for times in pushed_at:
            times[index] = now
        results = run_together(
            engine, [s.push_steps(frame) for s in sessions], batch=batched, on_forward=timings.append
        )
        ready = time.perf_counter()
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                raise result
            for out in result:
                pushed = pushed_at[i].pop(out.index, None)
                if measuring:  # every output released in the window counts, its latency too
                    outputs += 1
                    if pushed is not None:
                        latencies.append((ready - pushed) * 1e3)
    elapsed = time.perf_counter() - started
    return SessionsFigures(
        n=n,
        batched=batched,
        **_rate_and_latency(outputs, elapsed, latencies),
        frames=outputs,
        forwards=len(timings),
        shared_forwards=sum(t.members > 1 for t in timings),
        width=width,
        height=height,
        steps=steps,
        stream_batch=stream_batch,
        device=str(engine.device),
    )


def measure_stream(
    engine: Engine,
    *,
    width: int = 64,
    height: int = 64,
    steps: int = 2,
    stream_batch: bool = True,
    frames: int = 41,
    warmup_frames: int = 13,
    prompt: str = "a watercolor painting",
    seed: int = 0,
) -> StreamFigures:
    """One session of any :class:`~.interface.Engine` (one device, a pipeline over ranks, a remote one) through
    its public ``push``: ``warmup_frames + frames`` frames as fast as it takes them, measured over the last
    ``frames`` as :func:`measure_sessions` measures (outputs per second; latency from a frame's push to its output
    being ready). The session is closed afterwards."""
    if frames < 4:
        raise ValueError(f"frames must be >= 4 (one chunk), got {frames}")
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    session = engine.open_session(
        width=width, height=height, params=GenerationParams(prompt=prompt, steps=steps, stream_batch=stream_batch, seed=seed)
    )  # fmt: skip
    pushed_at: dict[int, float] = {}
    latencies: list[float] = []
    outputs = 0
    started = 0.0
    try:
        for index in range(warmup_frames + frames):
            measuring = index >= warmup_frames
            if index == warmup_frames:
                started = time.perf_counter()
            pushed_at[index] = time.perf_counter()
            results = session.push(np.roll(base, 2 * index, axis=1))
            ready = time.perf_counter()
            for out in results:
                pushed = pushed_at.pop(out.index, None)
                if measuring:
                    outputs += 1
                    if pushed is not None:
                        latencies.append((ready - pushed) * 1e3)
        elapsed = time.perf_counter() - started
    finally:
        close = getattr(session, "close", None)
        if callable(close):
            close()
    return StreamFigures(
        **_rate_and_latency(outputs, elapsed, latencies),
        frames=outputs,
        width=width,
        height=height,
        steps=steps,
        stream_batch=stream_batch,
        device=str(engine.device),
    )
