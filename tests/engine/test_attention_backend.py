"""``--attention-backend``: the DiT's attention through another kernel of diffusers' dispatch gives the same frames;
a backend whose package is missing, or an unknown one, is a clear error before anything loads."""

from __future__ import annotations

import importlib.util
import os
import typing

import numpy as np
import pytest

from sdlive.daemon.config import DaemonConfig
from sdlive.daemon.engine import SessionParams, StreamEngine
from sdlive.daemon.engine.attention import ATTENTION_BACKENDS
from sdlive.daemon.engine.compiled import COMPILE_MODES


@pytest.fixture(autouse=True)
def _prompt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLIVE_PROMPT_CACHE", os.environ.get("SDLIVE_PROMPT_CACHE", str(tmp_path)))


def frames(engine: StreamEngine) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    session = engine.open_session(width=64, height=48, params=SessionParams(prompt="a fox", steps=2, seed=1))
    out = []
    for _ in range(5 + 4 * 5):
        out += [o.pixels for o in session.push(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))]
    return out


def test_the_math_kernel_gives_the_frames_of_the_default_one():
    default = frames(StreamEngine.load("tiny", device="cpu"))
    math = StreamEngine.load("tiny", device="cpu", attention_backend="_native_math")
    processor = math.transformer.stream_blocks[0].attn1.processor
    assert getattr(processor._attention_backend, "value", None) == "_native_math"
    other = frames(math)
    assert len(other) == len(default) > 0
    worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(default, other, strict=True))
    assert worst <= 1, f"the math kernel's frames differ by up to {worst} levels"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_a_backend_without_its_package_names_the_package():
    with pytest.raises(ValueError, match="attention backend 'flash' cannot run here: .*flash-attn"):
        StreamEngine.load("tiny", device="cpu", attention_backend="flash")


def test_an_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="attention backend must be one of native, _native_flash"):
        StreamEngine.load("tiny", device="cpu", attention_backend="fastest")


def test_the_serve_flags_offer_exactly_the_engine_choices():
    fields = DaemonConfig.model_fields
    assert typing.get_args(fields["attention_backend"].annotation) == ATTENTION_BACKENDS
    assert typing.get_args(fields["compile_mode"].annotation) == COMPILE_MODES
