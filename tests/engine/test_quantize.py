"""``--quantize``: the DiT blocks' linear weights in FP8 through torchao. ``fp8-weight`` runs on the CPU too: the
weights are float8 tensors, the transformer holds fewer bytes and the stream still follows the unquantized one;
``fp8`` (FP8 matmuls) needs a GPU of compute capability 8.9+, and a missing torchao or a LoRA preset on a quantized
model is a clear error."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from sdlive.daemon.engine import SessionParams, StreamEngine
from sdlive.daemon.model.lora import LoraError

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install torchao)")


@pytest.fixture(autouse=True)
def _prompt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLIVE_PROMPT_CACHE", os.environ.get("SDLIVE_PROMPT_CACHE", str(tmp_path)))


def weight_bytes(engine: StreamEngine) -> int:
    return sum(t.numel() * t.element_size() for m in engine.transformer.blocks.modules()
               if isinstance(m, torch.nn.Linear) for t in _storage(m.weight))  # fmt: skip


def _storage(weight: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly torchao-subclassed) weight keeps."""
    names = getattr(weight, "__tensor_flatten__", None)
    if names is None:
        return [weight]
    return [getattr(weight, name) for name in names()[0]]


def stream(engine: StreamEngine) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    session = engine.open_session(width=64, height=48, params=SessionParams(prompt="a fox", steps=1, seed=1))
    out = []
    for i in range(5 + 4 * 6):
        base = np.full((48, 64, 3), 40 + 4 * i, np.uint8)
        out += [o.pixels for o in session.push(base + rng.integers(0, 30, base.shape, dtype=np.uint8))]
    return out


@needs_torchao
def test_fp8_weights_shrink_the_blocks_and_the_stream_follows_the_full_precision_one():
    full = StreamEngine.load("tiny", device="cpu")
    fp8 = StreamEngine.load("tiny", device="cpu", quantize="fp8-weight")
    assert fp8.quantize == "fp8-weight"
    weight = fp8.transformer.stream_blocks[0].attn1.to_q.weight
    assert any(t.dtype == torch.float8_e4m3fn for t in _storage(weight)), type(weight)
    assert weight_bytes(fp8) < 0.3 * weight_bytes(full)  # 1 byte instead of fp32's 4, plus one scale per row
    a, b = stream(full), stream(fp8)
    assert len(a) == len(b) > 0
    diff = np.mean([np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a, b, strict=True)])
    assert diff < 1.0, f"FP8 weights moved the frames by {diff:.2f} levels on average"  # measured: 0.30


@needs_torchao
def test_fp8_matmuls_need_a_gpu_that_has_them():
    with pytest.raises(ValueError, match="compute capability 8.9 or later.*fp8-weight stores FP8 weights"):
        StreamEngine.load("tiny", device="cpu", quantize="fp8")


def test_a_missing_torchao_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    with pytest.raises(ValueError, match="needs torchao: pip install torchao"):
        StreamEngine.load("tiny", device="cpu", quantize="fp8-weight")


@needs_torchao
def test_a_lora_preset_on_a_quantized_model_is_a_clear_error(tmp_path, write_tiny_lora):
    engine = StreamEngine.load("tiny", device="cpu", quantize="fp8-weight")
    path = tmp_path / "style.safetensors"
    write_tiny_lora(path)
    with pytest.raises(LoraError, match="do not load onto a quantized transformer.*--quantize none"):
        engine.lora.load(path)
