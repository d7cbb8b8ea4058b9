"""How much device memory a model and its sessions need, before anything is allocated.

The estimate runs the real code paths (``CausalWanTransformer3DModel.forward_stream``, ``StreamingVAE``) on torch's
``meta`` device, where tensors have shapes and dtypes but no storage, and counts the bytes alive at every step
(:class:`_LiveBytes`): the peak of a steady chunk, and what stays between chunks. Weights are counted from the
parameters of the same modules built on ``meta``; the KV cache from :class:`~sdlive.daemon.model.kv_cache.KVCache`
itself. So an estimate follows the code: a change to a model or a cache changes it with no table to update.

What it leaves out: the CUDA context and allocator slack (``CUDA_OVERHEAD_BYTES``, a flat allowance), kernels'
workspaces (cuDNN, flash-attn), and ``torch.compile``'s buffers.

``python -m sdlive.daemon.model.memory`` prints the table of ``docs/gpus.md``.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..protocol.constants import SIZE_MULTIPLE
from .configs import CachePolicy, ModelSpec, get_model_spec

__all__ = ["GiB", "MemoryEstimate", "ModelMemory", "SessionMemory", "estimate", "model_memory", "session_memory"]

GiB = 1024**3

CUDA_OVERHEAD_BYTES = int(0.75 * GiB)
"""The CUDA context, cuBLAS/cuDNN handles and allocator fragmentation: a flat allowance on top of the estimate."""


@dataclass(frozen=True)
class ModelMemory:
    """Bytes the loaded model holds whatever the sessions: the weights, and the text encoder while it encodes."""

    transformer: int
    vae: int
    text_encoder: int
    """Only while a prompt that is not in the embedding cache is encoded on the GPU (loaded, used, unloaded)."""

    @property
    def resident(self) -> int:
        return self.transformer + self.vae


@dataclass(frozen=True)
class SessionMemory:
    """Bytes one session needs at one size, step count and mode."""

    kv_cache: int
    """Self-attention KV caches of every stream-batch slot."""
    kv_transient: int
    """A copy made while the caches are repeated or reshaped (after the first chunk, on a mode or step change)."""
    cross_cache: int
    """The prompt's cross-attention keys and values (two while a prompt change blends)."""
    vae_cache: int
    """The streaming VAE's causal-conv feature caches (encoder and decoder)."""
    activations: int
    """The peak of a chunk's temporaries (the larger of the DiT's and the VAE's: they run one after the other)."""

    @property
    def steady(self) -> int:
        """What the session holds between chunks."""
        return self.kv_cache + self.cross_cache + self.vae_cache

    @property
    def peak(self) -> int:
        return self.steady + max(self.activations, self.kv_transient) + self.cross_cache


@dataclass(frozen=True)
class MemoryEstimate:
    """A model plus ``sessions`` equal sessions: the peak the device must hold."""

    model: ModelMemory
    session: SessionMemory
    sessions: int = 1

    @property
    def total(self) -> int:
        """Weights, every session's steady state, one session's chunk peak (sessions run one at a time) and the
        CUDA allowance."""
        one_peak = self.session.peak - self.session.steady
        return self.model.resident + self.sessions * self.session.steady + one_peak + CUDA_OVERHEAD_BYTES

    def describe(self) -> str:
        s = self.session
        return (
            f"{self.total / GiB:.1f} GiB: weights {self.model.resident / GiB:.2f}, per session {s.peak / GiB:.2f} "
            f"(KV cache {s.kv_cache / GiB:.2f}, VAE caches {s.vae_cache / GiB:.2f}, chunk peak "
            f"{max(s.activations, s.kv_transient) / GiB:.2f}), CUDA context {CUDA_OVERHEAD_BYTES / GiB:.2f}"
        )


# ------------------------------------------------------------------------------------------------ counting


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._tracked:
            return
        size = storage.nbytes()
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size

    def reset_peak(self) -> None:
        self.peak = self.live


def free_device_bytes(device: torch.device | str) -> int | None:
    """Bytes a new allocation may take on ``device``: free on the GPU plus what PyTorch's caching allocator holds
    unused; ``None`` off CUDA (the CPU is not checked)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free) + int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _param_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in module.parameters()) * item


def _shape_key(spec: ModelSpec) -> str:
    """What the memory depends on, as a hashable key (a spec holds dicts)."""
    return json.dumps([spec.transformer, spec.vae, spec.text_encoder, spec.text_len, spec.text_dim], sort_keys=True)


_MODULES: dict[tuple[str, torch.dtype], tuple[Any, Any]] = {}
_MODEL_MEMORY: dict[tuple[str, torch.dtype], ModelMemory] = {}
_SESSION_MEMORY: dict[tuple[Any, ...], SessionMemory] = {}
"""Estimates by what they depend on (the spec's shapes, not its name: a spec holds dicts, so it is no key)."""
_SESSION_MEMORY_ENTRIES = 64


def _meta_modules(spec: ModelSpec, dtype: torch.dtype) -> tuple[Any, Any]:
    from diffusers import AutoencoderKLWan
    from diffusers.utils import logging as diffusers_logging

    from .causal_wan import CausalWanTransformer3DModel

    key = (_shape_key(spec), dtype)
    if key not in _MODULES:
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # not the "keep these modules in float32" note: only bytes count
        try:
            with torch.device("meta"):
                transformer = CausalWanTransformer3DModel(**spec.transformer).to(dtype).eval()
                vae = AutoencoderKLWan(**spec.vae).to(dtype).eval()  # type: ignore[attr-defined]  # diffusers' stubs
        finally:
            diffusers_logging.set_verbosity(verbosity)
        _MODULES.clear()  # one model at a time is enough (a daemon has one)
        _MODULES[key] = (transformer, vae)
    return _MODULES[key]


def model_memory(model: str | ModelSpec, dtype: torch.dtype = torch.bfloat16) -> ModelMemory:
    """The weights of ``model`` in ``dtype`` (counted on ``meta``: nothing is allocated or downloaded)."""
    spec = get_model_spec(model)
    key = (_shape_key(spec), dtype)
    if key not in _MODEL_MEMORY:
        _MODEL_MEMORY[key] = _model_memory(spec, dtype)
    return _MODEL_MEMORY[key]


def _model_memory(spec: ModelSpec, dtype: torch.dtype) -> ModelMemory:
    from transformers import UMT5Config, UMT5EncoderModel

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef,attr-defined]

    transformer, vae = _meta_modules(spec, dtype)
    with no_init_weights(), torch.device("meta"):
        text = UMT5EncoderModel(UMT5Config(**spec.text_encoder))
    return ModelMemory(
        transformer=_param_bytes(transformer, dtype),
        vae=_param_bytes(vae, dtype),
        text_encoder=_param_bytes(text.encoder, dtype),  # the encoder's token embedding is the shared one
    )


def session_memory(
    model: str | ModelSpec,
    *,
    width: int,
    height: int,
    steps: int,
    stream_batch: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    cache_policy: CachePolicy | None = None,
    decoder: str = "full",
) -> SessionMemory:
    """One session of ``model`` at ``width×height``, ``steps`` denoising steps, stream batch or not, decoding
    with the Wan VAE (``"full"``) or the light decoder (``"light"``)."""
    spec = get_model_spec(model)
    policy = cache_policy or spec.kv_cache
    key = (_shape_key(spec), width, height, steps, stream_batch, dtype, policy, decoder)
    if key not in _SESSION_MEMORY:
        if len(_SESSION_MEMORY) >= _SESSION_MEMORY_ENTRIES:
            _SESSION_MEMORY.pop(next(iter(_SESSION_MEMORY)))  # the oldest: a daemon sees few shapes
        _SESSION_MEMORY[key] = _session_memory(spec, width, height, steps, stream_batch, dtype, policy, decoder)
    return _SESSION_MEMORY[key]


def _session_memory(
    spec: ModelSpec,
    width: int,
    height: int,
    steps: int,
    stream_batch: bool,
    dtype: torch.dtype,
    policy: CachePolicy,
    decoder: str,
) -> SessionMemory:
    from .kv_cache import KVCache
    from .vae import StreamingVAE

    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE or width < SIZE_MULTIPLE or height < SIZE_MULTIPLE:
        raise ValueError(f"width and height must be positive multiples of {SIZE_MULTIPLE}, got {width}x{height}")
    # Sink check off: its decision is a device->host read, which meta tensors cannot give (the bytes are the same).
    policy = dataclasses.replace(policy, sink_threshold=-1.0)
    transformer, vae = _meta_modules(spec, dtype)
    slots = steps if stream_batch and steps > 1 else 1
    h, w = height // 8, width // 8
    tokens_per_frame = (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)
    text = torch.zeros(1, spec.text_len, spec.text_dim, device="meta", dtype=dtype)
    counter = _LiveBytes()
    with torch.inference_mode(), counter:
        cache = KVCache(
            num_layers=len(transformer.stream_blocks), batch_size=slots, tokens_per_frame=tokens_per_frame,
            num_heads=transformer.config.num_attention_heads, head_dim=transformer.config.attention_head_dim,
            policy=policy, device="meta", dtype=dtype,
        )  # fmt: skip
        kv_cache = cache.nbytes
        cross = transformer.cross_attention_cache(text)
        cross_bytes = cross.nbytes
        light = None
        if decoder == "light":
            from .taehv import TinyWanDecoder

            with torch.device("meta"):
                light = TinyWanDecoder().to(dtype)
        svae = StreamingVAE(vae, accelerate=False, light_decoder=light)
        # The first chunk (5 frames → 2 latents) fills the VAE caches; a steady chunk (4 frames → 1 latent) is
        # the one measured.
        svae.decode(svae.encode(torch.zeros(1, 3, 5, height, width, device="meta", dtype=dtype))[:, :, :1])
        counter.reset_peak()
        before = counter.live
        latent = svae.encode(torch.zeros(1, 3, 4, height, width, device="meta", dtype=dtype))
        svae.decode(latent)
        vae_peak = counter.peak - before
        vae_cache = _cache_bytes(svae) + (svae._light.nbytes if svae._light is not None else 0)
        # One steady DiT forward over every slot.
        counter.reset_peak()
        before = counter.live
        x = torch.zeros(slots, spec.transformer["in_channels"], 1, h, w, device="meta", dtype=dtype)
        t = torch.zeros(slots, device="meta")
        transformer.forward_stream(x, t, cross, cache, commit=True)
        dit_peak = counter.peak - before
    return SessionMemory(
        kv_cache=kv_cache,
        kv_transient=kv_cache // slots if slots > 1 else 0,
        cross_cache=cross_bytes,
        vae_cache=vae_cache,
        activations=max(vae_peak, dit_peak),
    )


def _cache_bytes(svae: Any) -> int:
    total = 0
    for feat_map in (svae._enc_feat_map, svae._dec_feat_map):
        for item in feat_map:
            if isinstance(item, torch.Tensor):
                total += item.untyped_storage().nbytes()
    return total


def estimate(
    model: str | ModelSpec,
    *,
    width: int,
    height: int,
    steps: int,
    stream_batch: bool = True,
    sessions: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    cache_policy: CachePolicy | None = None,
    decoder: str = "full",
) -> MemoryEstimate:
    """The device memory ``model`` needs with ``sessions`` sessions of this shape (see :class:`MemoryEstimate`)."""
    return MemoryEstimate(
        model=model_memory(model, dtype),
        session=session_memory(model, width=width, height=height, steps=steps, stream_batch=stream_batch,
                               dtype=dtype, cache_policy=cache_policy, decoder=decoder),  # fmt: skip
        sessions=sessions,
    )


def max_sessions(model: str | ModelSpec, device_bytes: int, **shape: Any) -> int:
    """How many sessions of ``shape`` (``estimate``'s keywords) fit in ``device_bytes``; 0 when not even one."""
    one = estimate(model, sessions=1, **shape)
    spare = device_bytes - one.total
    if spare < 0:
        return 0
    return 1 + int(spare // max(1, one.session.steady))


# ------------------------------------------------------------------------------------------------ the table

SIZES = ((480, 832), (512, 512), (320, 576))
TIERS_GIB = (12, 16, 24, 80)
"""VRAM tiers of streamers' cards (RTX 3060 12 GB … 4090 24 GB, H100 80 GB): sold in GiB."""


def table(models: tuple[str, ...] = ("wan2.1-1.3b", "wan2.1-14b")) -> str:
    """Markdown: estimated GiB per model × size × steps × mode, and which VRAM tier it fits (``docs/gpus.md``)."""
    rows = ["| model | size (h×w) | steps | mode | estimate GiB | fits |", "|---|---|---|---|---|---|"]
    for name in models:
        for height, width in SIZES:
            for steps in (1, 2, 4):
                for batch in (True, False) if steps > 1 else (True,):
                    est = estimate(name, width=width, height=height, steps=steps, stream_batch=batch)
                    gib = est.total / GiB
                    fits = next((f"{tier} GB" for tier in TIERS_GIB if est.total * 1.1 <= tier * GiB), "> 80 GB")
                    mode = "stream batch" if batch and steps > 1 else "no-batch" if steps > 1 else "-"
                    rows.append(f"| {name} | {height}×{width} | {steps} | {mode} | {gib:.1f} | {fits} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
