"""``--compile`` (``engine.compiled``): the hot loop through inductor on CPU compiles once per stream shape. After a
warm-up stream of the same shape, a fresh session streams ≥ 20 chunks, through sink refreshes and RoPE resets, with
zero recompiles, and its frames equal an eager engine's within float tolerance."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from sdlive.daemon.engine import SessionParams, StreamEngine
from sdlive.daemon.model.kv_cache import KVCache

WIDTH, HEIGHT = 64, 48
# A sink refresh whenever a new frame's similarity to a sink drops below 0.9 (often, on this clip), and the RoPE
# position reset every 12 latent frames: the events that must not recompile.
POLICY = {"sink_threshold": 0.9, "rope_refresh_frames": 12}


def moving_clip(frames: int) -> list[np.ndarray]:
    """A square sliding over a gradient, with a cut to a different scene halfway (sinks go stale)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    clip = []
    for i in range(frames):
        scene = (x * 3 + y * 2 + (0 if i < frames // 2 else 120)) % 256
        frame = np.stack([scene, 255 - scene, (scene * 7) % 256], axis=-1).astype(np.uint8)
        left = (2 * i) % (WIDTH - 16)
        frame[16:32, left : left + 16] = (250, 30, 30)
        clip.append(frame)
    return clip


def stream(engine: StreamEngine, clip: list[np.ndarray], params: SessionParams) -> list[np.ndarray]:
    session = engine.open_session(width=WIDTH, height=HEIGHT, params=params)
    out = []
    for frame in clip:
        out += [o.pixels for o in session.push(frame)]
    return out


@pytest.fixture(scope="module", autouse=True)
def _prompt_cache(tmp_path_factory: pytest.TempPathFactory):
    os.environ.setdefault("SDLIVE_PROMPT_CACHE", str(tmp_path_factory.mktemp("prompts")))


def test_compiled_stream_never_recompiles_and_equals_eager(monkeypatch: pytest.MonkeyPatch):
    params = SessionParams(prompt="a fox", steps=2, stream_batch=True, seed=3)
    clip = moving_clip(5 + 4 * 24)  # the first chunk and 24 more
    eager = stream(StreamEngine.load("tiny", device="cpu", cache_policy=POLICY), clip, params)

    torch._dynamo.reset()
    counters.clear()
    engine = StreamEngine.load("tiny", device="cpu", cache_policy=POLICY, compile_mode="default")
    assert engine.compile_mode == "default"
    stream(engine, clip[:5 + 4 * 4], params)  # the warm-up: every graph of this shape compiles here
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "nothing was compiled"

    refreshes = []
    resolve = KVCache.resolve_sink_choices

    def spy(self, values):
        refreshes.extend(v for v in values if v >= 0)
        return resolve(self, values)

    monkeypatch.setattr(KVCache, "resolve_sink_choices", spy)
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile raises
        compiled = stream(engine, clip, params)
    assert counters["stats"]["unique_graphs"] == graphs
    assert refreshes, "the clip never refreshed a sink: the test would not cover it"
    positions_reset = (len(clip) - 1) // 4 + 1 > POLICY["rope_refresh_frames"]
    assert positions_reset

    assert len(compiled) == len(eager) >= len(clip) - 2 * 4  # the stream batch's latency: the last chunk or two
    worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(eager, compiled, strict=True))
    assert worst <= 2, f"compiled frames differ from eager by up to {worst} levels"


def test_unknown_compile_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="compile mode must be one of default, reduce-overhead"):
        StreamEngine.load("tiny", device="cpu", compile_mode="fast")  # type: ignore[arg-type]
