"""Checkpoint files and their formats: reading a state dict, recognising its format, converting it to diffusers keys.

DESIGN §3 "Build on diffusers". One converter per foreign format, chosen by marker keys (diffusers'
``CHECKPOINT_KEY_NAMES`` idea), each delegating to diffusers' own single-file converter:

=========================== ================================================ ==========================================
format                      marker key (after prefix stripping)              converter
=========================== ================================================ ==========================================
Wan transformer, original   ``head.modulation``                              ``convert_wan_transformer_to_diffusers``
                                                                             (renames, incl. the norm2↔norm3 swap)
Wan transformer, diffusers  ``condition_embedder.time_proj.weight``          none
Wan VAE, original (.pth)    ``decoder.middle.0.residual.0.gamma``            ``convert_wan_vae_to_diffusers``
Wan VAE, diffusers          ``decoder.mid_block.resnets.0.norm1.gamma``      none
UMT5 encoder, original      ``blocks.0.ffn.gate.0.weight``                   ``convert_wan_t5_to_transformers`` (here:
(Wan's ``T5Encoder``,                                                        a rename onto transformers'
``models_t5_umt5-xxl-enc-                                                    ``UMT5EncoderModel``, nothing else)
bf16.pth``)
UMT5 encoder, transformers  ``encoder.block.0.layer.0.SelfAttention.q.weight`` none
=========================== ================================================ ==========================================

The StreamDiffusionV2 generator ``model.pt`` is a torch file holding ``generator``, ``generator_ema`` or
``state_dict`` (first found wins, as upstream) or the raw state dict, with original Wan key names, possibly behind a
``model.`` prefix. Torch files are read with ``weights_only=True`` (no arbitrary pickles).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from safetensors.torch import load_file

from .errors import CheckpointError, pull_hint

__all__ = [
    "FORMAT_MARKERS",
    "TRANSFORMER_FORMATS",
    "VAE_FORMATS",
    "WAN_TRANSFORMER_DIFFUSERS",
    "WAN_TRANSFORMER_ORIGINAL",
    "WAN_VAE_DIFFUSERS",
    "WAN_VAE_ORIGINAL",
    "TEXT_ENCODER_FORMATS",
    "UMT5_ORIGINAL",
    "UMT5_TRANSFORMERS",
    "StateDict",
    "checkpoint_keys",
    "convert_text_encoder_state_dict",
    "convert_transformer_state_dict",
    "convert_vae_state_dict",
    "convert_wan_t5_to_transformers",
    "detect_format",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_V = TypeVar("_V")

WAN_TRANSFORMER_ORIGINAL = "wan_transformer_original"
WAN_TRANSFORMER_DIFFUSERS = "wan_transformer_diffusers"
WAN_VAE_ORIGINAL = "wan_vae_original"
WAN_VAE_DIFFUSERS = "wan_vae_diffusers"
UMT5_ORIGINAL = "umt5_original"
UMT5_TRANSFORMERS = "umt5_transformers"


def _diffusers_markers(name: str) -> tuple[str, ...]:
    """diffusers' marker keys of one format (a key or a list of keys there), without the wrapper-prefixed ones."""
    keys = CHECKPOINT_KEY_NAMES[name]
    return tuple(k for k in ([keys] if isinstance(keys, str) else keys) if not k.startswith("model."))


_ORIGINAL_VAE_MARKER = _diffusers_markers("wan_vae")[0]
# Marker keys per format (after prefix stripping), in the spirit of diffusers' CHECKPOINT_KEY_NAMES.
FORMAT_MARKERS: dict[str, tuple[str, ...]] = {
    WAN_TRANSFORMER_ORIGINAL: _diffusers_markers("wan") + ("blocks.0.self_attn.q.weight",),
    WAN_TRANSFORMER_DIFFUSERS: ("condition_embedder.time_proj.weight", "blocks.0.attn1.to_q.weight"),
    WAN_VAE_ORIGINAL: (_ORIGINAL_VAE_MARKER,),
    WAN_VAE_DIFFUSERS: ("decoder.mid_block.resnets.0.norm1.gamma",),
    UMT5_ORIGINAL: ("blocks.0.ffn.gate.0.weight", "blocks.0.pos_embedding.embedding.weight"),
    UMT5_TRANSFORMERS: ("encoder.block.0.layer.0.SelfAttention.q.weight",),
}
TRANSFORMER_FORMATS = (WAN_TRANSFORMER_ORIGINAL, WAN_TRANSFORMER_DIFFUSERS)
VAE_FORMATS = (WAN_VAE_ORIGINAL, WAN_VAE_DIFFUSERS)
TEXT_ENCODER_FORMATS = (UMT5_ORIGINAL, UMT5_TRANSFORMERS)
_DESCRIPTIONS: dict[str | None, str] = {
    WAN_TRANSFORMER_ORIGINAL: "an original-format Wan transformer",
    WAN_TRANSFORMER_DIFFUSERS: "a diffusers-format Wan transformer",
    WAN_VAE_ORIGINAL: "an original Wan VAE (Wan2.1_VAE.pth)",
    WAN_VAE_DIFFUSERS: "a diffusers-format Wan VAE",
    UMT5_ORIGINAL: "an original Wan UMT5 encoder (models_t5_umt5-xxl-enc-bf16.pth)",
    UMT5_TRANSFORMERS: "a transformers-format UMT5 encoder",
    None: "no known format",
}


# Wan's T5Encoder (wan/modules/t5.py; umt5 has one relative-position table per block) → transformers'
# UMT5EncoderModel. The FFN is gated GELU in both: Wan's fc2(fc1(x) * gelu(gate(x))) is transformers'
# wo(gelu(wi_0(x)) * wi_1(x)).
_T5_BLOCK_RENAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_T5_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def convert_wan_t5_to_transformers(state: StateDict) -> StateDict:
    """Wan's ``T5Encoder`` state dict (``models_t5_umt5-xxl-enc-bf16.pth``) in transformers' ``UMT5EncoderModel``
    key names; the token embedding is tied (``shared`` = ``encoder.embed_tokens``). An unknown key is kept as it
    is, so the strict load names it."""
    out: StateDict = {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif (m := _T5_BLOCK_KEY.fullmatch(key)) and m[2] in _T5_BLOCK_RENAMES:
            out[f"encoder.block.{m[1]}.{_T5_BLOCK_RENAMES[m[2]]}"] = value
        else:
            out[key] = value
    return out
# Format → the converter to diffusers key names (None: already diffusers keys).
_CONVERTERS: dict[str, Callable[[StateDict], StateDict] | None] = {
    WAN_TRANSFORMER_ORIGINAL: convert_wan_transformer_to_diffusers,  # renames, norm2↔norm3 swap included
    WAN_TRANSFORMER_DIFFUSERS: None,
    WAN_VAE_ORIGINAL: convert_wan_vae_to_diffusers,
    WAN_VAE_DIFFUSERS: None,
    UMT5_ORIGINAL: convert_wan_t5_to_transformers,
    UMT5_TRANSFORMERS: None,
}

# Wrapper prefixes seen on saved state dicts: upstream's `model.` (the generator wrapper), DDP's `module.`,
# torch.compile's `_orig_mod.`, ComfyUI-style `model.diffusion_model.`.
_PREFIXES = ("model.diffusion_model.", "module.", "_orig_mod.", "model.")
# StreamDiffusionV2's model.pt: the first of these entries found is the state dict (upstream order).
_GENERATOR_ENTRIES = ("generator", "generator_ema", "state_dict")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


# --------------------------------------------------------------------------------------------- reading files
def read_checkpoint(path: str | Path) -> StateDict:
    """The flat tensor state dict in ``path``: a safetensors file, a sharded safetensors index, or a torch file
    (``weights_only``), unwrapping a StreamDiffusionV2 ``generator`` / ``generator_ema`` / ``state_dict`` entry."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; {pull_hint('')}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, expected a weights file ({', '.join(_WEIGHT_SUFFIXES)})")
    try:
        if path.name.endswith(".safetensors.index.json"):
            index = json.loads(path.read_text())
            state: StateDict = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(load_file(path.parent / shard))
            return state
        if path.suffix == ".safetensors":
            return load_file(path)
        try:  # mmap: tensors are paged in as they are copied into the model, not read twice
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) torch.save format
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is the same user-facing problem
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}. Expected a safetensors or torch weights "
            f"file (torch files are read with weights_only=True); the file may be truncated: {pull_hint('')}"
        ) from exc
    if isinstance(obj, dict):
        for entry in _GENERATOR_ENTRIES:
            if isinstance(obj.get(entry), dict):
                obj = obj[entry]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else f"dict with keys {sorted(obj)[:6]}"
        raise CheckpointError(
            f"checkpoint {path} holds a {kind}, expected a state dict of tensors (or a dict with one of "
            f"{', '.join(_GENERATOR_ENTRIES)})"
        )
    return obj


def checkpoint_keys(path: Path) -> list[str]:
    """The keys of a checkpoint without reading its tensors where the format allows (safetensors)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                return list(f.keys())
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}; {pull_hint('')}") from exc
    return list(read_checkpoint(path))


# --------------------------------------------------------------------------------------------- formats
def _strip_prefixes(state: dict[str, _V]) -> dict[str, _V]:
    """Drop wrapper prefixes shared by every key (repeatedly: `module.model.` → ``)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
                break
    return state


def _select_prefixed(state: StateDict, formats: Sequence[str], source: str) -> tuple[StateDict, str | None]:
    """A wrapper's state dict with the model under a prefix plus other entries (``model.blocks…`` next to
    ``scheduler…``): keep the prefixed part when it is a known format (upstream loads such dicts non-strictly)."""
    for prefix in _PREFIXES:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        fmt = detect_format(sub) if sub else None
        if fmt in formats:
            logger.info(
                "%s: using the %d keys under %r, ignoring %d others", source, len(sub), prefix, len(state) - len(sub)
            )
            return sub, fmt
    return state, None


def detect_format(keys: Iterable[str]) -> str | None:
    """The format name whose marker keys appear in ``keys`` (a state dict or its keys; prefixes stripped), or
    ``None``."""
    stripped = set(_strip_prefixes(dict.fromkeys(keys)))
    for fmt, markers in FORMAT_MARKERS.items():
        if any(m in stripped for m in markers):
            return fmt
    return None


def _to_diffusers(
    state: StateDict, fmt: str | None, formats: Sequence[str], *, expected: str, source: str
) -> StateDict:
    """``state`` in diffusers key names if ``fmt`` is one of ``formats``, else the error naming what was expected."""
    if fmt is None or fmt not in formats:
        raise CheckpointError(f"{source} is {_DESCRIPTIONS[fmt]}, expected {expected}")
    convert = _CONVERTERS[fmt]
    return convert(state) if convert is not None else state


def convert_transformer_state_dict(state: StateDict, *, source: str = "<state dict>") -> StateDict:
    """Any supported transformer state dict → diffusers ``WanTransformer3DModel`` key names."""
    state = _strip_prefixes(dict(state))
    fmt = detect_format(state)
    if fmt is None:
        state, fmt = _select_prefixed(state, TRANSFORMER_FORMATS, source)
    return _to_diffusers(
        state,
        fmt,
        TRANSFORMER_FORMATS,
        expected="a Wan transformer (original keys such as 'head.modulation' or diffusers keys such as "
        "'condition_embedder.time_proj.weight')",
        source=source,
    )


def convert_vae_state_dict(state: StateDict, *, source: str = "<state dict>") -> StateDict:
    """Any supported VAE state dict → diffusers ``AutoencoderKLWan`` key names."""
    state = _strip_prefixes(dict(state))
    return _to_diffusers(
        state,
        detect_format(state),
        VAE_FORMATS,
        expected=f"a Wan VAE (original keys such as '{_ORIGINAL_VAE_MARKER}' or diffusers keys such as "
        "'decoder.mid_block.resnets.0.norm1.gamma')",
        source=source,
    )


def convert_text_encoder_state_dict(state: StateDict, *, source: str = "<state dict>") -> StateDict:
    """Any supported UMT5 encoder state dict → transformers ``UMT5EncoderModel`` key names (with the tied
    ``shared.weight`` / ``encoder.embed_tokens.weight`` both present)."""
    state = _strip_prefixes(dict(state))
    fmt = detect_format(state)
    state = _to_diffusers(
        state,
        fmt,
        TEXT_ENCODER_FORMATS,
        expected="a UMT5 encoder (Wan's keys such as 'blocks.0.ffn.gate.0.weight' or transformers keys such as "
        "'encoder.block.0.layer.0.SelfAttention.q.weight')",
        source=source,
    )
    for a, b in (("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight", "shared.weight")):
        if a in state and b not in state:
            state[b] = state[a]
    return state
