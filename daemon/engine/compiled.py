"""``--compile``: the streaming hot loop through ``torch.compile`` (inductor), with shapes that stay put.

What is compiled, in place and lazily (the first calls of each shape compile; the daemon's warm-up makes those calls):

* the transformer's blocks by regional compilation (diffusers' ``compile_repeated_blocks``): one compiled block
  serves all of them, because nothing a block traces depends on its index (the processors get their block's text
  K/V and cache context per call, ``causal_wan``);
* the KV-cache write and the attention over the cache stay eager inside each block (a deliberate graph break,
  ``CausalWanAttnProcessor._cached_attention``): the cache's bookkeeping is Python and its window grows while it
  fills, so the graphs before and after it see the same shapes on every chunk, through sink refreshes and RoPE resets;
* the Wan VAE's encoder and decoder, their causal-conv feature caches as inputs (on CPU the convs stay oneDNN's,
  ``vae.onednn_conv3d``).

Shapes are static (``dynamic=False``): each stream size (and batch) compiles once; ``mode="reduce-overhead"``
(CUDA) also records CUDA graphs over those shapes. The light decoder is not compiled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from ..model.bundle import ModelBundle

__all__ = ["COMPILE_MODES", "CompileMode", "compile_hot_loop"]

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


def check_compile_mode(mode: str) -> CompileMode:
    """``mode`` if it is one of :data:`COMPILE_MODES`, else a ``ValueError`` listing them."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def compile_hot_loop(bundle: ModelBundle, mode: CompileMode = "default") -> None:
    """Compile ``bundle``'s transformer blocks and VAE encoder/decoder in place (module docstring)."""
    options = {"dynamic": False, "mode": None if mode == "default" else check_compile_mode(mode)}
    bundle.transformer.compile_repeated_blocks(**options)
    bundle.vae.encoder.compile(**options)
    bundle.vae.decoder.compile(**options)
