"""``StreamEngine.load``: a ``ModelSpec`` wherever a name goes; the KV cache settings per load, validated."""

from __future__ import annotations

import dataclasses

import pytest

from sdlive.daemon.engine import StreamEngine
from sdlive.daemon.model.configs import DEFAULT_CACHE_POLICY, TINY, CachePolicy


def test_load_takes_a_model_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLIVE_PROMPT_CACHE", str(tmp_path))
    spec = dataclasses.replace(TINY, name="tiny-custom", kv_cache=CachePolicy(num_kv_cache=4, num_sink=1))
    engine = StreamEngine.load(spec, device="cpu")
    assert engine.model_name == "tiny-custom"
    assert engine.cache_policy == CachePolicy(num_kv_cache=4, num_sink=1)
    assert engine.new_kv_cache(batch_size=1, tokens_per_frame=4).num_kv_cache == 4


def test_cache_policy_per_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLIVE_PROMPT_CACHE", str(tmp_path))
    whole = CachePolicy(num_kv_cache=8, num_sink=2, sink_threshold=-1, rope_refresh_frames=0)
    assert StreamEngine.load("tiny", device="cpu", cache_policy=whole).cache_policy == whole
    engine = StreamEngine.load("tiny", device="cpu", cache_policy={"num_kv_cache": 7, "num_sink": None})
    assert engine.cache_policy == dataclasses.replace(DEFAULT_CACHE_POLICY, num_kv_cache=7)
    assert StreamEngine.load("tiny", device="cpu").cache_policy == DEFAULT_CACHE_POLICY
    with pytest.raises(AttributeError):
        engine.cache_policy = whole  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_kv_cache": 0}, "num_kv_cache must be >= 1"),
        ({"num_sink": 6}, r"num_sink must be in \[0, num_kv_cache\)"),
        ({"sink_threshold": 1.5}, r"sink_threshold must be a cosine similarity in \[-1, 1\]"),
        ({"rope_refresh_frames": 3}, "rope_refresh_frames must be 0"),
        ({"num_kv_cache": 6.5}, "num_kv_cache must be an integer"),
        ({"kv_frames": 6}, "unknown cache setting.*kv_frames.*num_kv_cache"),
    ],
)
def test_bad_cache_settings_fail_before_loading(overrides, message, monkeypatch):
    import sdlive.daemon.model.bundle as bundle

    monkeypatch.setattr(bundle, "load_model_bundle", lambda *a, **k: pytest.fail("loaded despite a bad setting"))
    with pytest.raises(ValueError, match=message):
        StreamEngine.load("tiny", device="cpu", cache_policy=overrides)


def test_get_model_spec_takes_a_spec_or_a_name():
    from sdlive.daemon.model.configs import get_model_spec

    spec = dataclasses.replace(TINY, name="mine")
    assert get_model_spec(spec) is spec
    assert get_model_spec("tiny") is TINY
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        get_model_spec("nope")
    with pytest.raises(ValueError, match="a name .* or a ModelSpec, got dict"):
        get_model_spec({"name": "tiny"})  # type: ignore[arg-type]
