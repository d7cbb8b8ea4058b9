"""LoRA styles for the Wan transformer: files as the community publishes them, loaded as PEFT adapters.

A LoRA file (``.safetensors``) in diffusers/PEFT layout (``transformer.blocks.0.attn1.to_q.lora_A.weight``) or in
the original Wan / ComfyUI layout (``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` …) is read through
diffusers' ``WanLoraLoaderMixin.lora_state_dict`` (which converts the latter) and loaded onto the transformer with
``load_lora_adapter`` (PEFT). Loaded once per file; every session then picks its own weights per adapter
(:meth:`LoraAdapters.activate` before each forward: the daemon runs one session's forward at a time), so switching
a preset re-weights adapters live: no reload, no reset of the stream.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["MAX_ADAPTERS", "LoraAdapters", "LoraError", "read_lora"]

MAX_ADAPTERS = 8
"""LoRA files one engine holds at once (each adds a small matmul to every adapted layer)."""


class LoraError(ValueError):
    """A LoRA file that is missing, unreadable or does not fit the model; the message names the file."""


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA state dict of ``path`` in diffusers layout (``transformer.`` keys), converted from the original Wan
    layout when needed. Raises :class:`LoraError` naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoraError(f"LoRA file {path} not found (a preset's `lora` is relative to the preset file's folder)")
    if path.suffix != ".safetensors":
        raise LoraError(f"LoRA file {path}: only .safetensors LoRAs are loaded (a format that cannot run code)")
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    try:
        state = WanLoraLoaderMixin.lora_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - whatever the reader says, it is this file's problem
        raise LoraError(f"LoRA file {path} cannot be read as a Wan LoRA: {exc}") from None
    if isinstance(state, tuple):  # some diffusers versions return (state_dict, metadata)
        state = state[0]
    if not state:
        raise LoraError(f"LoRA file {path} holds no LoRA weights")
    return dict(state)


def _check_fits(path: Path, state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Every ``lora_A``/``lora_B`` pair must name a linear layer of ``model`` with matching sizes."""
    problems: list[str] = []
    matched = 0
    for key, tensor in state.items():
        m = re.match(r"^(?:transformer\.)?(.+)\.lora_([AB])\.weight$", key)
        if m is None:
            continue
        name, which = m.groups()
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name} (no such layer)")
            continue
        if not isinstance(layer, torch.nn.Linear):
            base = getattr(layer, "base_layer", None)  # already wrapped by PEFT for another adapter
            if not isinstance(base, torch.nn.Linear):
                problems.append(f"{name} (not a linear layer)")
                continue
            layer = base
        size = layer.in_features if which == "A" else layer.out_features
        got = tensor.shape[1] if which == "A" else tensor.shape[0]
        if got != size:
            problems.append(f"{name}.lora_{which} ({got} != {size})")
        matched += 1
    if problems or not matched:
        detail = ", ".join(problems[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise LoraError(
            f"LoRA file {path} does not fit this model ({detail or 'no layer of it is adapted'}): "
            "is it a LoRA for this Wan model size (1.3B vs 14B)?"
        )


class LoraAdapters:
    """The LoRA adapters loaded on one transformer, and the weights in effect."""

    def __init__(self, transformer: Any, *, quantized: str | None = None) -> None:
        self.transformer = transformer
        self.quantized = quantized
        """The transformer's quantization (``--quantize``), which LoRA files cannot load onto; None: none."""
        self._names: dict[Path, str] = {}
        self._active: tuple[tuple[str, float], ...] | None = None

    @property
    def names(self) -> list[str]:
        return list(self._names.values())

    def load(self, path: str | Path) -> str:
        """The adapter name of ``path``, loading it the first time (:class:`LoraError` when it cannot be)."""
        path = Path(path).expanduser().resolve()
        name = self._names.get(path)
        if name is not None:
            return name
        if self.quantized is not None:
            raise LoraError(f"LoRA file {path}: LoRA styles do not load onto a quantized transformer (--quantize "
                            f"{self.quantized}); run the daemon with --quantize none to use preset LoRAs")
        if len(self._names) >= MAX_ADAPTERS:
            raise LoraError(f"LoRA file {path}: this engine already holds {MAX_ADAPTERS} LoRA files; restart the daemon")
        state = read_lora(path)
        _check_fits(path, state, self.transformer)
        stem = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:32] or "lora"
        name = f"{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        try:
            with warnings.catch_warnings():  # PEFT warns that a second adapter is a second adapter: that is the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.transformer.load_lora_adapter(state, adapter_name=name, prefix="transformer")
        except Exception as exc:  # noqa: BLE001 - PEFT's own message, with the file named
            raise LoraError(f"LoRA file {path} could not be loaded: {exc}") from None
        self._names[path] = name
        self._active = None  # the new adapter starts at PEFT's weight 1: set every weight again
        self.activate({})
        logger.info("LoRA %s loaded as adapter %s", path, name)
        return name

    def activate(self, weights: dict[str, float]) -> None:
        """Set every loaded adapter's weight (absent names: 0) for the forwards that follow."""
        if not self._names:
            return
        wanted = tuple((name, float(weights.get(name, 0.0))) for name in self._names.values())
        if wanted == self._active:
            return
        self.transformer.set_adapters([n for n, _ in wanted], [w for _, w in wanted])
        self._active = wanted
