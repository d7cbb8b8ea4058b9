"""StreamSession on the tiny model (CPU): frame accounting, latency, determinism, live parameter changes, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlive.daemon.engine import SessionParams, StreamEngine

W, H = 64, 48


@pytest.fixture(scope="module")
def engine() -> StreamEngine:
    return StreamEngine.load("tiny", device="cpu")


def clip(frames: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(H, W, channels), dtype=np.uint8)
    out = np.stack([np.roll(base, 2 * i, axis=1) for i in range(frames)])
    if channels == 4:
        out[..., 3] = 255
    return out


def run(session, frames: np.ndarray) -> list:
    outputs = []
    for frame in frames:
        outputs.extend(session.push(frame))
    return outputs


def params(**kw) -> SessionParams:
    return SessionParams(**{"prompt": "a watercolor painting", "steps": 2, "seed": 1, **kw})


@pytest.mark.parametrize("pixel_format,channels", [("rgb24", 3), ("bgr24", 3), ("rgba", 4), ("bgra", 4)])
def test_every_pushed_frame_comes_out_once_in_order_after_flush(engine, pixel_format, channels):
    session = engine.open_session(width=W, height=H, params=params(), pixel_format=pixel_format)
    frames = clip(15, channels)
    out = run(session, frames) + session.flush()
    assert [f.index for f in out] == list(range(15))
    for f in out:
        assert f.pixels.shape == (H, W, channels) and f.pixels.dtype == np.uint8
        if channels == 4:
            assert (f.pixels[..., 3] == 255).all()
    assert session.frames_in == 15 and session.frames_out == 15


@pytest.mark.parametrize("steps,stream_batch", [(1, True), (2, True), (3, True), (2, False), (4, False)])
def test_output_lag_never_exceeds_latency_frames_and_reaches_it(engine, steps, stream_batch):
    session = engine.open_session(width=W, height=H, params=params(steps=steps, stream_batch=stream_batch))
    lags = {}
    for pushed, frame in enumerate(clip(5 + 4 * 6), start=1):
        for f in session.push(frame):
            lags[f.index] = pushed - 1 - f.index
    assert lags, "no output at all"
    assert max(lags.values()) == session.latency_frames
    depth = steps if stream_batch else 1
    assert session.latency_frames == max(4, 3 + 4 * (depth - 1))


def test_the_first_chunk_is_five_frames_then_four(engine):
    session = engine.open_session(width=W, height=H, params=params(steps=1))
    frames = clip(13)
    ready_after = [len(session.push(f)) for f in frames]
    assert ready_after == [0, 0, 0, 0, 5, 0, 0, 0, 4, 0, 0, 0, 4]


def test_same_seed_same_stream_other_seed_other_stream(engine):
    frames = clip(13)
    a = run(engine.open_session(width=W, height=H, params=params(seed=7)), frames)
    b = run(engine.open_session(width=W, height=H, params=params(seed=7)), frames)
    c = run(engine.open_session(width=W, height=H, params=params(seed=8)), frames)
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x.pixels, z.pixels) for x, z in zip(a, c, strict=True))


def test_injected_noise_replaces_the_generator(engine):
    frames = clip(9)
    zeros = run(engine.open_session(width=W, height=H, params=params(seed=1), noise_fn=torch.zeros), frames)
    zeros_other_seed = run(engine.open_session(width=W, height=H, params=params(seed=2), noise_fn=torch.zeros), frames)
    seeded = run(engine.open_session(width=W, height=H, params=params(seed=1)), frames)
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(zeros, zeros_other_seed, strict=True))
    assert any(not np.array_equal(x.pixels, y.pixels) for x, y in zip(zeros, seeded, strict=True))


def test_stream_batch_and_no_batch_agree_at_one_step(engine):
    frames = clip(17)
    a = run(engine.open_session(width=W, height=H, params=params(steps=1, stream_batch=True)), frames)
    b = run(engine.open_session(width=W, height=H, params=params(steps=1, stream_batch=False)), frames)
    assert len(a) == len(b) == 17
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a, b, strict=True))


def test_flush_finishes_the_pipeline_exactly_as_more_input_would(engine):
    # With zero noise the stream is a pure function of the input, so the frames a flush drains out of the stream
    # batch must equal the ones the pipeline produces when more chunks push them through.
    frames = clip(5 + 4 * 5)
    short = engine.open_session(width=W, height=H, params=params(steps=3), noise_fn=torch.zeros)
    flushed = run(short, frames[:17]) + short.flush()
    longer = engine.open_session(width=W, height=H, params=params(steps=3), noise_fn=torch.zeros)
    pipelined = run(longer, frames)
    assert [f.index for f in flushed] == list(range(17))
    for f in flushed:
        np.testing.assert_allclose(f.pixels.astype(int), pipelined[f.index].pixels.astype(int), atol=1)


def test_prompt_change_blends_over_chunks_and_keeps_caches_and_counters(engine):
    session = engine.open_session(width=W, height=H, params=params(transition_chunks=4))
    frames = clip(5 + 4 * 8)
    run(session, frames[:9])
    chunks, positions = session.chunks, session._batch_cache.frame_positions()
    old = engine.encode_prompt("a watercolor painting")
    new = engine.encode_prompt("a neon cyberpunk city at night")
    session.set_params(prompt="a neon cyberpunk city at night")
    assert session.chunks == chunks and session.frames_in == 9
    assert session._batch_cache.frame_positions() == positions  # no cache reset
    run(session, frames[9:13])  # one chunk: a quarter of the way
    torch.testing.assert_close(session._embeds, torch.lerp(old, new, 0.25))
    run(session, frames[13:25])  # three more: arrived
    torch.testing.assert_close(session._embeds, new)
    assert [p for p in session._batch_cache.frame_positions()] == [p + 4 for p in positions]


def test_steps_and_mode_change_mid_stream_lose_no_frame(engine):
    session = engine.open_session(width=W, height=H, params=params(steps=2))
    frames = clip(5 + 4 * 9)
    out = run(session, frames[:13])
    session.set_params(steps=3)
    out += run(session, frames[13:25])
    session.set_params(stream_batch=False, steps=1)
    out += run(session, frames[25:33])
    session.set_params(stream_batch=True, steps=4)
    out += run(session, frames[33:]) + session.flush()
    assert [f.index for f in out] == list(range(len(frames)))


def test_output_is_an_image_not_a_constant(engine):
    out = run(engine.open_session(width=W, height=H, params=params(steps=1)), clip(9))
    pixels = np.stack([f.pixels for f in out]).astype(np.float32)
    assert pixels.std() > 1.0


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((H, W + 16, 3), np.uint8), "frame shape"),
        (np.zeros((H, W), np.uint8), "frame shape"),
        (np.zeros((H, W, 3), np.float32), "dtype"),
        ([[0, 0, 0]], "numpy array or a torch tensor"),
        (torch.full((3, H, W), float("nan")), "NaN"),
        (torch.zeros((3, H, W), dtype=torch.int64), "floating point"),
        (torch.zeros((4, H, W)), r"\[3, 48, 64\]"),
    ],
)
def test_bad_frames_raise_a_clear_value_error_and_the_session_goes_on(engine, bad, match):
    session = engine.open_session(width=W, height=H, params=params(steps=1))
    good = clip(9)
    run(session, good[:3])
    with pytest.raises(ValueError, match=match):
        session.push(bad)
    assert session.frames_in == 3
    assert len(run(session, good[3:])) == 9


@pytest.mark.parametrize("change,match", [({"steps": 0}, "steps"), ({"steps": 5}, "steps"), ({"prompt": "  "}, "prompt"), ({"noise_scale": 0}, "noise_scale"), ({"colour": 1}, "colour")])
def test_bad_params_raise_and_change_nothing(engine, change, match):
    session = engine.open_session(width=W, height=H, params=params())
    run(session, clip(5))
    before = session.params
    with pytest.raises(ValueError, match=match):
        session.set_params(**change)
    assert session.params == before


@pytest.mark.parametrize("width,height", [(60, 48), (64, 0), (8, 8)])
def test_sizes_that_are_not_multiples_of_16_are_refused(engine, width, height):
    with pytest.raises(ValueError, match="multiple of 16"):
        engine.open_session(width=width, height=height, params=params())


def test_unknown_model_and_pixel_format_are_clear_errors(engine):
    with pytest.raises(ValueError, match="unknown model 'wan3'"):
        StreamEngine.load("wan3")
    with pytest.raises(ValueError, match="unknown pixel format"):
        engine.open_session(width=W, height=H, params=params(), pixel_format="yuv420")


def test_the_cuda_dtype_bf16_runs_the_whole_loop_on_cpu():
    """bf16 is what CUDA uses: model, caches and VAE in bf16, schedule maths in float64, frames still uint8."""
    engine = StreamEngine.load("tiny", device="cpu", dtype=torch.bfloat16)
    assert engine.transformer.dtype == torch.bfloat16
    session = engine.open_session(width=W, height=H, params=params(steps=2))
    out = run(session, clip(13))
    session.set_params(prompt="an oil painting", steps=3)
    out += run(session, clip(8, seed=1)) + session.flush()
    assert [f.index for f in out] == list(range(21))
    assert all(f.pixels.dtype == np.uint8 for f in out)
    assert np.stack([f.pixels for f in out]).std() > 1.0
