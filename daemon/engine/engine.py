"""The loaded model on one device, shared by every session it opens."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..model.configs import (
    DEFAULT_COMPAT,
    CachePolicy,
    Compat,
    ModelSpec,
    check_compat,
    check_compat_policy,
    get_model_spec,
)
from ..model.lora import LoraAdapters
from ..model.memory import GiB, SessionMemory, free_device_bytes, session_memory
from ..protocol.params import GenerationParams
from .attention import check_attention_backend
from .compiled import CompileMode, check_compile_mode, compile_hot_loop
from .interface import InsufficientMemory
from .precision import Quantize, check_quantize, quantize_transformer
from .session import ForwardCall, NoiseFn, StreamSession

if TYPE_CHECKING:  # the model (diffusers) loads with the first engine, not with this module
    from ..model.bundle import ModelBundle, ProgressFn
    from ..model.causal_wan import CausalWanTransformer3DModel, CrossAttentionCache
    from ..model.kv_cache import KVCache
    from ..model.vae import StreamingVAE

logger = logging.getLogger(__name__)

PROMPT_MEMO_SIZE = 16

Decoder = Literal["full", "light"]
DECODERS: tuple[str, ...] = ("full", "light")

MEMORY_MARGIN = 1.1
"""A session opens only when its estimated peak times this fits in the free device memory."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CUDA when available, else CPU; a CUDA request without CUDA is a clear error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but torch sees no CUDA device: use --device cpu or install a CUDA build of torch"
        )
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (DESIGN §3)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class StreamEngine:
    """A model bundle (causal DiT, VAE weights, prompt encoder) on one device; sessions hold all stream state.
    Implements :class:`~.interface.Engine`."""

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        device: torch.device,
        dtype: torch.dtype,
        normalize_latents: bool = False,
        compat: Compat = DEFAULT_COMPAT,
        compile_mode: CompileMode | None = None,
        quantize: Quantize = "none",
    ) -> None:
        self.compat: Compat = check_compat(compat)
        """``"upstream"`` | ``"clean"``: every session's KV caches and VAE follow it (see ``load``)."""
        self.bundle = bundle
        self.spec: ModelSpec = bundle.spec
        self.device = device
        self.dtype = dtype
        self.normalize_latents = normalize_latents
        self.transformer: CausalWanTransformer3DModel = bundle.transformer
        self._prompt_memo: dict[str, torch.Tensor] = {}
        self.quantize: Quantize = quantize
        """How the transformer's block weights were quantized at load (``engine.precision``), ``"none"``."""
        self.lora = LoraAdapters(self.transformer, quantized=None if quantize == "none" else quantize)
        """The LoRA style files loaded on the transformer; each session sets its own weights (``set_lora``)."""
        self.compile_mode = compile_mode
        """The ``torch.compile`` mode the bundle's hot loop was compiled with (``load``), ``None``: eager."""
        self.layers: range = range(len(self.transformer.blocks))
        """The transformer blocks this engine runs and holds caches for: all of them, except on a pipeline stage
        (``sdlive.daemon.distributed``)."""

    @classmethod
    def load(
        cls,
        model: str | ModelSpec = "tiny",
        *,
        weights: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        normalize_latents: bool = False,
        random_weights: bool = False,
        cache_policy: CachePolicy | Mapping[str, int | float | None] | None = None,
        base_only: bool = False,
        compat: Compat = DEFAULT_COMPAT,
        progress: ProgressFn | None = None,
        decoder: Decoder = "full",
        light_decoder: str | Path | None = None,
        compile_mode: CompileMode | None = None,
        attention_backend: str = "native",
        quantize: Quantize = "none",
    ) -> StreamEngine:
        """Build the engine for a model: a registered name (``tiny``, ``wan2.1-1.3b``, ``wan2.1-14b``) or a
        ``ModelSpec``.

        ``normalize_latents=False`` reproduces upstream, whose DiT sees the raw VAE mean (DESIGN §3).
        ``random_weights=True`` builds the real shapes from the spec's seed instead of loading weights (benchmarks).
        ``cache_policy``: the KV cache settings for this engine, a whole ``CachePolicy`` or a mapping of fields to
        change on the spec's (``{"num_kv_cache": 8}``; ``None`` values keep the default), validated before
        anything loads (``ValueError``). ``base_only=True`` accepts a base Wan transformer when no
        StreamDiffusionV2 generator is found (otherwise a ``CheckpointError``).
        ``compat``: ``"upstream"`` (default) reproduces upstream StreamDiffusionV2's behaviour, quirks included, that
        its distilled weights were tuned and evaluated with (its KV-cache bookkeeping and sink checks, its
        stream-batch warm-up, its bf16 decoder input: ``configs.check_compat``); ``"clean"`` runs sdlive's own rules.
        Validated before anything loads (``ValueError``), with the
        cache settings too (``"upstream"`` needs ``num_kv_cache >= 4``: ``configs.check_compat_policy``).
        ``decoder="light"``: sessions decode with the TAEHV-style tiny decoder (``model.taehv``) instead of the Wan
        VAE's: ``light_decoder`` names its ``taew2_1`` file, else one beside ``weights`` is used (``tiny``: random).
        ``compile_mode``: compile the hot loop with ``torch.compile`` in this mode (``engine.compiled``; the first
        chunks of each stream size compile, so warm up first); ``None``: eager.
        ``attention_backend``: diffusers' attention dispatch for every attention (:data:`ATTENTION_BACKENDS`:
        ``native`` is PyTorch's SDPA, which picks its own kernel; ``flash``, ``_flash_3``, ``sage`` … need their
        package: a ``ValueError`` names it before anything loads).
        ``quantize``: ``"fp8-weight"`` / ``"fp8"`` stores the blocks' linear weights in FP8 through torchao
        (``engine.precision``; checked before anything loads: torchao installed, ``fp8`` on a GPU that has FP8).
        """
        from ..model.bundle import light_decoder_for, load_model_bundle

        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
        if compile_mode is not None:
            check_compile_mode(compile_mode)
        check_attention_backend(attention_backend)

        # a clear error for an unknown name (or a bad cache setting) before anything loads
        compat = check_compat(compat)
        spec = get_model_spec(model)  # a name or a ModelSpec
        if isinstance(cache_policy, CachePolicy):
            spec = dataclasses.replace(spec, kv_cache=cache_policy)
        elif cache_policy is not None:
            spec = dataclasses.replace(spec, kv_cache=spec.kv_cache.with_overrides(**cache_policy))
        check_compat_policy(compat, spec.kv_cache)
        if random_weights:
            spec = dataclasses.replace(spec, random_weights=True)
        device = resolve_device(device)
        quantize = check_quantize(quantize, device)
        dtype = dtype or default_dtype(device)
        bundle = load_model_bundle(
            spec,
            weights=Path(weights) if weights else None,
            device=device,
            dtype=dtype,
            base_only=base_only,
            progress=progress,
        )
        if decoder == "light":
            bundle.light_decoder, source = light_decoder_for(spec, light_decoder, weights, device=device, dtype=dtype)
            bundle.sources["light_decoder"] = source
            if progress is not None:
                progress(f"light decoder from {source}")
        quantize_transformer(bundle.transformer, quantize)  # before compiling: the graphs see the FP8 weights
        if attention_backend != "native":
            bundle.transformer.set_attention_backend(attention_backend)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the VAE's convs run the same few shapes all stream long
        if compile_mode is not None:
            compile_hot_loop(bundle, compile_mode)
        logger.info(
            "engine ready: model=%s device=%s dtype=%s cache=%s compat=%s compile=%s attention=%s quantize=%s",
            spec.name,
            device,
            dtype,
            spec.kv_cache,
            compat,
            compile_mode or "off",
            attention_backend,
            quantize,
        )
        return cls(bundle, device=device, dtype=dtype, normalize_latents=normalize_latents, compat=compat,
                   compile_mode=compile_mode, quantize=quantize)  # fmt: skip

    @property
    def acceleration(self) -> str | None:
        """What runs the hot loop other than eager, SDPA and the loaded weights (``--compile``,
        ``--attention-backend``, ``--quantize``), for ``hello`` / ``status``; None when nothing does."""
        processor = self.transformer.stream_blocks[0].attn1.processor
        backend = getattr(getattr(processor, "_attention_backend", None), "value", None)
        parts = [f"torch.compile ({self.compile_mode})" if self.compile_mode else "",
                 f"attention {backend}" if backend and backend != "native" else "",
                 f"weights {self.quantize}" if self.quantize != "none" else ""]  # fmt: skip
        return " · ".join(p for p in parts if p) or None

    @property
    def model_name(self) -> str:
        return self.spec.name

    @property
    def decoder(self) -> Decoder:
        """``"light"`` when sessions decode with the light decoder, else ``"full"`` (the Wan VAE's)."""
        return "light" if self.bundle.light_decoder is not None else "full"

    @property
    def cache_policy(self) -> CachePolicy:
        """The KV cache settings every session of this engine gets (read-only)."""
        return self.spec.kv_cache

    def open_session(
        self,
        *,
        width: int,
        height: int,
        params: GenerationParams | None = None,
        pixel_format: str = "rgb24",
        noise_fn: NoiseFn | None = None,
    ) -> StreamSession:
        """A new stream at ``width×height`` (multiples of 16); ``params`` default to the model's steps and noise.

        On CUDA the session's memory is estimated first (``model.memory``) and compared with what the device has
        free: :class:`InsufficientMemory` (a ``ValueError``) names what would fit instead of an out-of-memory error
        halfway through a chunk."""
        if params is None:
            params = GenerationParams(steps=self.spec.default_steps, noise_scale=self.spec.noise_scale)
        self.check_memory(width=width, height=height, params=params)
        with torch.inference_mode():
            return StreamSession(
                self, width=width, height=height, params=params, pixel_format=pixel_format, noise_fn=noise_fn
            )

    # ---------------------------------------------------------------- used by sessions

    def new_vae(self) -> StreamingVAE:
        """A streaming VAE with its own causal-conv caches over the shared weights (decoding as ``compat`` says)."""
        return self.bundle.new_vae(normalize_latents=self.normalize_latents, compat=self.compat)

    def new_kv_cache(self, *, batch_size: int, tokens_per_frame: int) -> KVCache:
        return self.transformer.new_kv_cache(
            batch_size=batch_size,
            tokens_per_frame=tokens_per_frame,
            policy=self.spec.kv_cache,
            device=self.device,
            dtype=self.dtype,
            compat=self.compat,
            layers=self.layers,
        )

    def cross_attention_cache(self, embeds: torch.Tensor) -> CrossAttentionCache:
        """The text K/V of this engine's blocks for a prompt embedding (``[1, text_len, text_dim]``)."""
        return self.transformer.cross_attention_cache(embeds, layers=self.layers)

    def run_forward(self, call: ForwardCall) -> torch.Tensor:
        """One DiT forward a session needs (with its LoRA weights active); the flow, float32. A pipeline stage
        runs its part of it across the ranks instead."""
        self.lora.activate(call.lora)
        return self.transformer.forward_stream(call.x, call.t, call.cross, call.cache, commit=call.commit)

    @property
    def prompt_vocabulary(self) -> list[str] | None:
        """The only prompts this model takes (``mini``: its styles), or ``None`` when it has a text encoder and
        takes any prompt."""
        prompts = getattr(self.bundle.text, "prompts", None)
        return list(prompts) if prompts is not None else None

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """[1, text_len, text_dim] on the engine's device; the on-disk cache means a known prompt never loads the
        text encoder."""
        if not prompt or not prompt.strip():
            raise ValueError("prompt must not be empty")
        embeds = self._prompt_memo.get(prompt)
        if embeds is None:
            embeds = self.bundle.text.encode(prompt).to(self.device, self.dtype)
            if len(self._prompt_memo) >= PROMPT_MEMO_SIZE:
                self._prompt_memo.pop(next(iter(self._prompt_memo)))
            self._prompt_memo[prompt] = embeds
        return embeds

    def synchronize(self) -> None:
        """Wait for queued device work (stage timings on CUDA would lie otherwise)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free_device_bytes(self) -> int | None:
        """Bytes free on the engine's GPU (what a new session may take), ``None`` on the CPU (not checked)."""
        return free_device_bytes(self.device)

    def session_memory(self, *, width: int, height: int, steps: int, stream_batch: bool) -> SessionMemory:
        """The estimated bytes of one session of this shape (``model.memory.session_memory``)."""
        return session_memory(self.spec, width=width, height=height, steps=steps, stream_batch=stream_batch,
                              dtype=self.dtype, cache_policy=self.spec.kv_cache, decoder=self.decoder)  # fmt: skip

    def check_memory(self, *, width: int, height: int, params: GenerationParams) -> None:
        """Raise :class:`InsufficientMemory` when a session of this shape would not fit in the free device memory
        (with ``MEMORY_MARGIN`` to spare); nothing on the CPU."""
        free = self.free_device_bytes()
        if free is None:
            return
        need = self.session_memory(width=width, height=height, steps=params.steps, stream_batch=params.stream_batch)
        if need.peak * MEMORY_MARGIN <= free:
            return
        options = []
        for label, w, h, steps, batch in (
            ("no-batch mode", width, height, params.steps, False),
            ("1 step", width, height, 1, False),
            ("512x512, 1 step", 512, 512, 1, False),
            ("576x320, 1 step", 576, 320, 1, False),
        ):
            if (w, h, steps, batch) == (width, height, params.steps, params.stream_batch):
                continue
            other = self.session_memory(width=w, height=h, steps=steps, stream_batch=batch)
            if other.peak * MEMORY_MARGIN <= free:
                options.append(f"{label} (~{other.peak / GiB:.1f} GiB)")
        mode = "stream batch" if params.stream_batch and params.steps > 1 else "no-batch"
        fits = "; would fit: " + ", ".join(options) if options else "; nothing smaller fits either: close a session"
        raise InsufficientMemory(
            f"not enough GPU memory for a {width}x{height} session at {params.steps} step(s), {mode}: it needs "
            f"~{need.peak / GiB:.1f} GiB, {free / GiB:.1f} GiB free on {self.device}{fits}"
        )

    def memory_bytes(self) -> int:
        """Device memory in use by torch (CUDA), or the parameter bytes on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return sum(p.numel() * p.element_size() for p in self.transformer.parameters())


if TYPE_CHECKING:  # mypy checks that the engine and its sessions implement the caller's protocols
    from .interface import Engine, EngineSession

    _engine_conforms: type[Engine] = StreamEngine
    _session_conforms: type[EngineSession] = StreamSession
