"""``--attention-backend``: which kernel runs the DiT's attention, through diffusers' attention dispatch.

The streaming processors call ``dispatch_attention_fn`` with the backend diffusers' ``set_attention_backend`` put on
them, and never pass a mask (the stream batch's unequal lengths run as separate unmasked calls), so the mask-less
kernels serve every case. Only backends that run from an installed package are offered: the ``*_hub`` ones would
download kernels at startup, which a streamer's offline box cannot.
"""

from __future__ import annotations

__all__ = ["ATTENTION_BACKENDS", "check_attention_backend"]

ATTENTION_BACKENDS: tuple[str, ...] = (
    "native",  # PyTorch SDPA, choosing flash / memory-efficient / cuDNN / math itself (the default)
    "_native_flash",
    "_native_efficient",
    "_native_cudnn",
    "_native_math",
    "flex",
    "flash",  # flash-attn 2
    "_flash_3",  # flash-attn 3 (Hopper)
    "sage",
    "xformers",
)


def check_attention_backend(name: str) -> str:
    """``name`` when it is one of :data:`ATTENTION_BACKENDS` and its package is installed, else a ``ValueError``
    that lists the backends or names the package to install."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as exc:  # diffusers names the missing package
        raise ValueError(f"attention backend {name!r} cannot run here: {exc}") from None
    return name
