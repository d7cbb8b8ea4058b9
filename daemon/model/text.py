"""Prompt → text embedding: the UMT5 encoder (``TextEncoder``) behind an on-disk embedding cache (``PromptEncoder``).

DESIGN §3 "Prompts". Wan conditions on the UMT5-XXL encoder's last hidden state, 512 tokens, with the positions past
the prompt's length set to zero (diffusers ``WanPipeline._get_t5_prompt_embeds``, upstream ``T5EncoderModel``).
The encoder is large (5.7B parameters for XXL) and a preset switch must never wait on it, so embeddings are cached on
disk per (model, prompt) as safetensors: a known prompt never loads the encoder, the encoder loads lazily on the
first unknown prompt and can be unloaded after warm-up.

``tiny`` has a randomly initialised tiny UMT5 (``TINY.text_encoder``, fixed seed) and, to work offline, transformers'
``ByT5Tokenizer``: a byte-level tokenizer that needs no vocabulary file (ids = UTF-8 bytes + 3; pad 0, eos 1), so
its ids fit any vocabulary of at least 259 entries. Real models use the ``tokenizer/`` folder of the diffusers layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from .configs import ModelSpec

__all__ = ["PromptEncoder", "TextEncoder", "default_prompt_cache_dir", "prompt_key"]

logger = logging.getLogger(__name__)

_CACHE_FORMAT = "1"
"""Bumped when the cache file layout changes: old files are then simply not found."""


def default_prompt_cache_dir() -> Path:
    """``$SDLIVE_PROMPT_CACHE`` if set, else the user cache dir (platformdirs) ``…/sdlive/prompts``."""
    env = os.environ.get("SDLIVE_PROMPT_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("sdlive")) / "prompts"


def _check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    cleaned = prompt_clean(prompt)
    if not cleaned:
        raise ValueError("prompt must not be empty")
    return cleaned


def prompt_key(model: str, prompt: str) -> str:
    """The cache key of ``prompt`` for ``model``: sha256 over the model name and the cleaned prompt."""
    cleaned = _check_prompt(prompt)
    return hashlib.sha256(f"{model}\0{cleaned}".encode()).hexdigest()


def _namespace(spec: ModelSpec) -> str:
    """``<name>-<fingerprint>``: a changed text-encoder config (or tiny's seed) never reads stale embeddings."""
    shaping = {"text_encoder": spec.text_encoder, "text_len": spec.text_len, "format": _CACHE_FORMAT}
    if spec.random_weights:
        shaping["seed"] = spec.seed
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec.name}-{digest}"


class TextEncoder:
    """UMT5 encoder + tokenizer: ``encode(prompts) -> [B, text_len, d_model]`` with padding positions zeroed."""

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        text_len: int = 512,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        *,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TextEncoder:
        """Build the encoder of ``spec``.

        ``spec.random_weights`` (``tiny``): random weights from ``spec.seed`` (deterministic, the global RNG is left
        untouched) and the byte-level tokenizer. Otherwise ``path`` is a diffusers-format model folder holding
        ``text_encoder/`` (``UMT5EncoderModel``) and ``tokenizer/``.
        """
        if spec.random_weights:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                model = UMT5EncoderModel(UMT5Config(**spec.text_encoder))
            tokenizer: PreTrainedTokenizerBase = ByT5Tokenizer()
            # transformers wraps PreTrainedModel.to in functools.wraps(Module.to), which mypy reads as unbound.
            return cls(model.to(device=device, dtype=dtype), tokenizer, text_len=spec.text_len)  # type: ignore[call-arg]
        if path is None:
            raise ValueError(f"the text encoder of {spec.name} needs a model folder (text_encoder/, tokenizer/)")
        root = Path(path)
        model = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        return cls(model.to(device), tokenizer, text_len=spec.text_len)  # type: ignore[arg-type]  # as above

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """[B, text_len, d_model] float32 embeddings; rows past each prompt's token count are exactly zero."""
        return self.encode_with_lengths(prompts)[0]

    __call__ = encode

    @torch.no_grad()
    def encode_with_lengths(self, prompts: str | list[str]) -> tuple[torch.Tensor, list[int]]:
        """``encode`` plus each prompt's token count (eos included): the rows that are not padding."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cleaned = [_check_prompt(p) for p in prompts]
        tokens = self.tokenizer(
            cleaned,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # zero the padding positions (upstream: u[:len], pad 0)
        return hidden, [int(n) for n in tokens.attention_mask.sum(dim=1)]


class PromptEncoder:
    """Cached prompt embeddings for one model: ``encode(prompt) -> [1, text_len, text_dim]`` (float32, CPU).

    Files: ``<cache_dir>/<model>/<sha256(model, prompt)>.safetensors`` holding the prompt's non-padding rows
    (``[n_tokens, text_dim]``) and, as metadata, the prompt and model name. A hit reads the file; a miss loads the
    text encoder through ``load_encoder`` (once; ``unload()`` frees it), encodes, and writes the file atomically.
    """

    def __init__(
        self,
        model_name: str,
        load_encoder: Callable[[], TextEncoder],
        *,
        text_len: int = 512,
        text_dim: int,
        cache_dir: str | Path | None = None,
        namespace: str | None = None,
        keep_loaded: bool = True,
        linger_s: float = 3.0,
    ) -> None:
        self.model_name = model_name
        self.keep_loaded = keep_loaded
        """False: the text encoder is loaded for cache misses and unloaded ``linger_s`` after the last one (a burst of
        new prompts, e.g. every preset at startup, loads it once), so it does not stay on the GPU beside the DiT
        (UMT5-XXL: 11 GB in bf16)."""
        self.linger_s = linger_s
        self._warming = False
        self._unload_timer: threading.Timer | None = None
        self.namespace = namespace or model_name
        """Cache sub-folder and key prefix: the model name plus a fingerprint of what shapes its embeddings."""
        self.text_len = text_len
        self.text_dim = text_dim
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_prompt_cache_dir()
        self._load_encoder = load_encoder
        self._encoder: TextEncoder | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_spec(
        cls,
        spec: ModelSpec,
        *,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | Path | None = None,
    ) -> PromptEncoder:
        """The prompt encoder of ``spec``; the text encoder (``TextEncoder.from_spec``) loads on the first miss."""
        return cls(
            spec.name,
            lambda: TextEncoder.from_spec(spec, path=path, device=device, dtype=dtype),
            text_len=spec.text_len,
            text_dim=spec.text_dim,
            cache_dir=cache_dir,
            namespace=_namespace(spec),
        )

    @property
    def loaded(self) -> bool:
        """Whether the text encoder is in memory."""
        return self._encoder is not None

    def cache_path(self, prompt: str) -> Path:
        return self.cache_dir / self.namespace / f"{prompt_key(self.namespace, prompt)}.safetensors"

    def is_cached(self, prompt: str) -> bool:
        return self.cache_path(prompt).is_file()

    def encode(self, prompt: str) -> torch.Tensor:
        """[1, text_len, text_dim] float32 on CPU. Raises ``ValueError`` for an empty prompt."""
        path = self.cache_path(prompt)  # validates the prompt
        rows = self._read(path)
        if rows is None:
            with self._lock:
                rows = self._read(path)  # another thread may have written it meanwhile
                if rows is None:
                    try:
                        rows = self._compute(prompt)
                        self._write(path, prompt, rows)
                    finally:
                        if not self.keep_loaded and not self._warming:
                            self._unload_later()
        out = rows.new_zeros(1, self.text_len, self.text_dim)
        out[0, : rows.shape[0]] = rows
        return out

    def warm(self, prompts: list[str]) -> None:
        """Make sure every prompt is on disk (loads the encoder only if one is missing, once for all of them)."""
        self._warming = True
        try:
            for prompt in prompts:
                self.encode(prompt)
        finally:
            self._warming = False
            if not self.keep_loaded:
                self.unload()

    def unload(self) -> None:
        """Drop the text encoder (cached prompts keep working; a new prompt loads it again)."""
        with self._lock:
            self._drop_encoder()

    def _unload_later(self) -> None:
        if self._unload_timer is not None:
            self._unload_timer.cancel()
        if self.linger_s <= 0:
            self._drop_encoder()
            return
        self._unload_timer = threading.Timer(self.linger_s, self.unload)
        self._unload_timer.daemon = True
        self._unload_timer.start()

    def _drop_encoder(self) -> None:
        if self._unload_timer is not None:
            self._unload_timer.cancel()
            self._unload_timer = None
        if self._encoder is None:
            return
        device = self._encoder.device
        logger.info("unloading the %s text encoder", self.model_name)
        self._encoder = None
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give its blocks back: the sessions' caches and the next load need them

    # ------------------------------------------------------------------ internals
    def _compute(self, prompt: str) -> torch.Tensor:
        if self._encoder is None:
            logger.info("loading the %s text encoder (prompt not in %s)", self.model_name, self.cache_dir)
            self._encoder = self._load_encoder()
        embeds, (n,) = self._encoder.encode_with_lengths(prompt)
        if embeds.shape[1:] != (self.text_len, self.text_dim):
            raise ValueError(
                f"text encoder of {self.model_name} gave {tuple(embeds.shape)}, "
                f"expected [1, {self.text_len}, {self.text_dim}]"
            )
        return embeds[0, :n].float().cpu().contiguous()

    def _read(self, path: Path) -> torch.Tensor | None:
        if not path.is_file():
            return None
        try:
            rows = load_file(path)["embeds"]
        except Exception as exc:  # a truncated or foreign file is a miss, rewritten below
            logger.warning("ignoring unreadable prompt cache file %s: %s", path, exc)
            return None
        if rows.ndim != 2 or rows.shape[1] != self.text_dim or rows.shape[0] > self.text_len:
            logger.warning("ignoring prompt cache file %s with shape %s", path, tuple(rows.shape))
            return None
        return rows.float()

    def _write(self, path: Path, prompt: str, rows: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"model": self.model_name, "namespace": self.namespace, "prompt": prompt, "format": _CACHE_FORMAT}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"embeds": rows}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
