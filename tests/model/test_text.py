"""Text encoder (UMT5, padding zeroed) and the on-disk prompt embedding cache."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdlive.daemon.model.configs import TINY
from sdlive.daemon.model.text import PromptEncoder, TextEncoder, prompt_key


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.from_spec(TINY)


class CountingLoader:
    """Loads the tiny text encoder and counts how often it was asked to."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> TextEncoder:
        self.calls += 1
        return TextEncoder.from_spec(TINY)


def _prompt_encoder(tmp_path, loader) -> PromptEncoder:
    return PromptEncoder("tiny", loader, text_len=TINY.text_len, text_dim=TINY.text_dim, cache_dir=tmp_path)


def test_output_shape_and_padding_zeroed(encoder):
    embeds, lengths = encoder.encode_with_lengths(["a cat", "a watercolor painting of a fox in the snow"])
    assert embeds.shape == (2, 512, TINY.text_dim) and embeds.dtype == torch.float32
    assert lengths == [len("a cat") + 1, len("a watercolor painting of a fox in the snow") + 1]  # bytes + eos
    for row, n in zip(embeds, lengths, strict=True):
        assert torch.all(row[:n].abs().amax(dim=-1) > 0)
        assert torch.count_nonzero(row[n:]) == 0


def test_padding_does_not_leak_into_the_prompt_rows(encoder):
    """The attention mask keeps padding out: a prompt alone equals the same prompt batched with a longer one."""
    alone = encoder.encode("a cat")
    batched = encoder.encode(["a cat", "a much longer prompt about a cat on a mat"])[:1]
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-6)


def test_tiny_encoder_is_deterministic_and_leaves_global_rng_alone(encoder):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    other = TextEncoder.from_spec(TINY)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.testing.assert_close(other.encode("neon city"), encoder.encode("neon city"), rtol=0, atol=0)


def test_same_prompt_same_embedding_and_whitespace_is_cleaned(encoder):
    a = encoder.encode("anime style, bright colors")
    torch.testing.assert_close(encoder.encode("anime style, bright colors"), a, rtol=0, atol=0)
    torch.testing.assert_close(encoder.encode("  anime   style,\n bright colors "), a, rtol=0, atol=0)
    assert not torch.equal(encoder.encode("oil painting"), a)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_is_rejected(tmp_path, encoder, prompt):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        encoder.encode(prompt)
    loader = CountingLoader()
    with pytest.raises(ValueError, match="prompt must not be empty"):
        _prompt_encoder(tmp_path, loader).encode(prompt)
    assert loader.calls == 0


def test_cache_hit_does_not_instantiate_the_encoder(tmp_path, encoder, monkeypatch):
    first = _prompt_encoder(tmp_path, CountingLoader())
    embeds = first.encode("a cat in the rain")
    assert first.loaded and first.is_cached("a cat in the rain")
    torch.testing.assert_close(embeds, encoder.encode("a cat in the rain"), rtol=0, atol=0)

    # A new process-like PromptEncoder over the same cache dir: the encoder must never be built.
    def forbidden() -> TextEncoder:
        raise AssertionError("text encoder loaded for a cached prompt")

    monkeypatch.setattr(TextEncoder, "from_spec", classmethod(lambda *a, **k: forbidden()))
    second = _prompt_encoder(tmp_path, forbidden)
    again = second.encode("a cat in the rain")
    assert not second.loaded
    torch.testing.assert_close(again, embeds, rtol=0, atol=0)
    assert again.shape == (1, 512, TINY.text_dim)
    assert torch.count_nonzero(again[0, len("a cat in the rain") + 1 :]) == 0


def test_cache_file_holds_only_prompt_rows_and_metadata(tmp_path):
    pe = _prompt_encoder(tmp_path, CountingLoader())
    pe.encode("sunset")
    path = pe.cache_path("sunset")
    assert path.parent.parent == tmp_path and path.name == prompt_key("tiny", "sunset") + ".safetensors"
    rows = load_file(path)["embeds"]
    assert rows.shape == (len("sunset") + 1, TINY.text_dim)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert f.metadata()["prompt"] == "sunset"
        assert f.metadata()["model"] == "tiny"


def test_encoder_loads_once_lazily_and_unloads(tmp_path):
    loader = CountingLoader()
    pe = _prompt_encoder(tmp_path, loader)
    assert not pe.loaded and loader.calls == 0
    pe.encode("one")
    pe.encode("two")
    assert loader.calls == 1 and pe.loaded
    pe.unload()
    assert not pe.loaded
    pe.encode("one")  # cached: stays unloaded
    assert not pe.loaded and loader.calls == 1
    pe.encode("three")  # unknown: loads again
    assert pe.loaded and loader.calls == 2


def test_corrupt_cache_file_is_recomputed(tmp_path, encoder):
    pe = _prompt_encoder(tmp_path, CountingLoader())
    path = pe.cache_path("glitch")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    torch.testing.assert_close(pe.encode("glitch"), encoder.encode("glitch"), rtol=0, atol=0)
    assert load_file(path)["embeds"].shape[0] == len("glitch") + 1


def test_for_spec_namespaces_the_cache_by_config(tmp_path):
    pe = PromptEncoder.for_spec(TINY, cache_dir=tmp_path)
    assert pe.namespace.startswith("tiny-") and pe.cache_path("x").parent == tmp_path / pe.namespace
    emb = pe.encode("pixel art")
    assert emb.shape == (1, TINY.text_len, TINY.text_dim)
    assert pe.loaded


def test_prompt_cache_dir_env(monkeypatch, tmp_path):
    from sdlive.daemon.model.text import default_prompt_cache_dir

    monkeypatch.setenv("SDLIVE_PROMPT_CACHE", str(tmp_path / "pc"))
    assert default_prompt_cache_dir() == tmp_path / "pc"
    monkeypatch.delenv("SDLIVE_PROMPT_CACHE")
    assert default_prompt_cache_dir().parts[-2:] == ("sdlive", "prompts")


def test_a_transient_encoder_loads_for_a_burst_of_misses_and_then_leaves(tmp_path, wait_for):
    """``keep_loaded=False`` (the GPU default): misses in a row share one load; ``linger_s`` after the last one the
    encoder is gone; a cached prompt never loads it; ``warm`` loads it once for all its prompts and unloads."""
    loader = CountingLoader()
    text = PromptEncoder("tiny", loader, text_len=TINY.text_len, text_dim=TINY.text_dim, cache_dir=tmp_path,
                         keep_loaded=False, linger_s=0.3)  # fmt: skip
    text.encode("a fox")
    text.encode("a hare")
    assert loader.calls == 1 and text.loaded
    assert wait_for(lambda: not text.loaded, timeout_s=5)
    text.encode("a fox")  # on disk: no load
    assert loader.calls == 1 and not text.loaded
    text.warm(["an owl", "a lynx", "a fox"])
    assert loader.calls == 2 and not text.loaded  # unloaded at once after warm
    assert text.is_cached("an owl") and text.is_cached("a lynx")
