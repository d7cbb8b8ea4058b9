"""``--quantize``: FP8 weights for the DiT's linear layers through torchao (an optional dependency, ``pip install
torchao``: not in the ``gpu`` extra, because with it installed diffusers imports it at every model load, printing
load errors for its CUDA kernels on CPU builds, and the relay's frame-matching tests failed in that environment for
a reason not found yet).

* ``fp8-weight``: the blocks' linear weights stored in float8 (e4m3, one scale per output channel), dequantised in
  each matmul: half the transformer's bf16 weight memory on any device (torchao's ``Float8WeightOnlyConfig``).
* ``fp8``: weights and activations in float8, the matmuls in FP8 on GPUs that have it (compute capability 8.9+:
  Ada, Hopper, Blackwell; torchao's ``Float8DynamicActivationFloat8WeightConfig``).

Only the linear layers inside the transformer blocks change (attention projections and feed-forward: nearly all of
the weights); the embedders, the head and every norm keep the run's dtype. ``none`` (default) leaves the model as
loaded. LoRA style files do not load onto a quantized transformer (``LoraAdapters`` says so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import torch

if TYPE_CHECKING:
    from ..model.causal_wan import CausalWanTransformer3DModel

__all__ = ["QUANTIZE_MODES", "Quantize", "check_quantize", "quantize_transformer"]

Quantize = Literal["none", "fp8-weight", "fp8"]
QUANTIZE_MODES: tuple[str, ...] = get_args(Quantize)
FP8_COMPUTE_CAPABILITY = (8, 9)


def check_quantize(mode: str, device: torch.device) -> Quantize:
    """``mode`` when this machine can run it, else a ``ValueError`` that says what is missing."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return "none"
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ValueError(f"--quantize {mode} needs torchao: pip install torchao (or run with --quantize none)") from None
    if mode == "fp8":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < FP8_COMPUTE_CAPABILITY:
            where = f"compute capability {capability[0]}.{capability[1]}" if capability else str(device)
            raise ValueError(
                f"--quantize fp8 runs FP8 matmuls, which need an NVIDIA GPU of compute capability 8.9 or later "
                f"(RTX 40xx, L4, H100 …); this is {where}. --quantize fp8-weight stores FP8 weights on any device"
            )
    return mode  # type: ignore[return-value]


def quantize_transformer(transformer: CausalWanTransformer3DModel, mode: Quantize) -> None:
    """Quantize the linear layers of ``transformer``'s blocks in place (module docstring); ``none``: nothing."""
    if mode == "none":
        return
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    config = (
        Float8WeightOnlyConfig()
        if mode == "fp8-weight"
        else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    )
    quantize_(transformer.blocks, config, filter_fn=lambda module, _name: isinstance(module, torch.nn.Linear))
