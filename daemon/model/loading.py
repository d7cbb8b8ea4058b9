"""Finding, converting and loading model weights: ``load_model_bundle``, ``pull_model``, ``list_models``.

DESIGN §3 "Build on diffusers" / "Model configs". One converter per foreign format, chosen by marker keys
(diffusers' ``CHECKPOINT_KEY_NAMES`` idea), each delegating to diffusers' own single-file converter:

=========================== ================================================ ==========================================
format                      marker key (after prefix stripping)              converter
=========================== ================================================ ==========================================
Wan transformer, original   ``head.modulation``                              ``convert_wan_transformer_to_diffusers``
                                                                             (renames, incl. the norm2↔norm3 swap)
Wan transformer, diffusers  ``condition_embedder.time_proj.weight``          none
Wan VAE, original (.pth)    ``decoder.middle.0.residual.0.gamma``            ``convert_wan_vae_to_diffusers``
Wan VAE, diffusers          ``decoder.mid_block.resnets.0.norm1.gamma``      none
=========================== ================================================ ==========================================

The StreamDiffusionV2 generator ``model.pt`` is a torch file holding ``generator``, ``generator_ema`` or
``state_dict`` (first found wins, as upstream) or the raw state dict, with original Wan key names, possibly behind a
``model.`` prefix. Torch files are read with ``weights_only=True`` (no arbitrary pickles).

Where weights come from (never downloaded here; ``pull_model`` downloads):

- ``tiny``: random weights from the spec's seed (deterministic; nothing is read).
- ``weights=`` a diffusers-format folder (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``; a
  generator ``model.pt`` inside it, at the spec's ``generator_file`` path or top level, overrides the transformer),
  an original Wan folder (``diffusion_pytorch_model*.safetensors``, ``Wan2.1_VAE.pth``), or a single transformer
  file (generator ``model.pt``, original or diffusers safetensors); parts it lacks come from the hub cache.
- otherwise the hub cache (``huggingface_hub``, ``local_files_only``): the spec's diffusers base repo for VAE,
  text encoder and tokenizer, and the StreamDiffusionV2 generator for the transformer.

Anything missing or wrong is one :class:`CheckpointError` naming the file, what was expected and the fix.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from diffusers.models.modeling_utils import no_init_weights
from safetensors.torch import load_file

from .causal_wan import CausalWanTransformer3DModel
from .configs import MODEL_NAMES, ModelSpec, get_model_spec
from .text import PromptEncoder
from .vae import StreamingVAE

__all__ = [
    "CheckpointError",
    "ModelBundle",
    "ModelInfo",
    "PullProgress",
    "convert_transformer_state_dict",
    "convert_vae_state_dict",
    "detect_format",
    "list_models",
    "load_model_bundle",
    "load_transformer",
    "load_vae",
    "pull_model",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str], None]

WAN_TRANSFORMER_ORIGINAL = "wan_transformer_original"
WAN_TRANSFORMER_DIFFUSERS = "wan_transformer_diffusers"
WAN_VAE_ORIGINAL = "wan_vae_original"
WAN_VAE_DIFFUSERS = "wan_vae_diffusers"

# Marker keys per format (after prefix stripping), in the spirit of diffusers' CHECKPOINT_KEY_NAMES.
FORMAT_MARKERS: dict[str, tuple[str, ...]] = {
    WAN_TRANSFORMER_ORIGINAL: tuple(k for k in CHECKPOINT_KEY_NAMES["wan"] if not k.startswith("model."))
    + ("blocks.0.self_attn.q.weight",),
    WAN_TRANSFORMER_DIFFUSERS: ("condition_embedder.time_proj.weight", "blocks.0.attn1.to_q.weight"),
    WAN_VAE_ORIGINAL: (CHECKPOINT_KEY_NAMES["wan_vae"],),
    WAN_VAE_DIFFUSERS: ("decoder.mid_block.resnets.0.norm1.gamma",),
}
_TRANSFORMER_FORMATS = (WAN_TRANSFORMER_ORIGINAL, WAN_TRANSFORMER_DIFFUSERS)
_VAE_FORMATS = (WAN_VAE_ORIGINAL, WAN_VAE_DIFFUSERS)

# Wrapper prefixes seen on saved state dicts: upstream's `model.` (the generator wrapper), DDP's `module.`,
# torch.compile's `_orig_mod.`, ComfyUI-style `model.diffusion_model.`.
_PREFIXES = ("model.diffusion_model.", "module.", "_orig_mod.", "model.")
# StreamDiffusionV2's model.pt: the first of these entries found is the state dict (upstream order).
_GENERATOR_ENTRIES = ("generator", "generator_ema", "state_dict")

ORIGINAL_VAE_FILE = "Wan2.1_VAE.pth"
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# What `pull_model` fetches from the diffusers base repo: the StreamDiffusionV2 generator replaces its transformer.
_BASE_PATTERNS = ["model_index.json", "vae/*", "text_encoder/*", "tokenizer/*", "transformer/config.json"]


class CheckpointError(ValueError):
    """A checkpoint is missing or is not what was expected. The message names the file, the expectation and the
    command that fixes it."""


def _pull_hint(spec: ModelSpec | str) -> str:
    name = spec.name if isinstance(spec, ModelSpec) else spec
    if name == "tiny" or name not in MODEL_NAMES:
        name = "wan2.1-1.3b"
    return f"run `sdlive models pull {name}` (or pass --weights PATH to a local copy)"


# --------------------------------------------------------------------------------------------- reading files
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat tensor state dict in ``path``: a safetensors file, a sharded safetensors index, or a torch file
    (``weights_only``), unwrapping a StreamDiffusionV2 ``generator`` / ``generator_ema`` / ``state_dict`` entry."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; {_pull_hint('')}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, expected a weights file ({', '.join(_WEIGHT_SUFFIXES)})")
    try:
        if path.name.endswith(".safetensors.index.json"):
            index = json.loads(path.read_text())
            state: dict[str, torch.Tensor] = {}
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
            f"file (torch files are read with weights_only=True); the file may be truncated: {_pull_hint('')}"
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


def _checkpoint_keys(path: Path) -> list[str]:
    """The keys of a checkpoint without reading its tensors where the format allows (safetensors)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                return list(f.keys())
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}; {_pull_hint('')}") from exc
    return list(read_checkpoint(path))


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _select_prefixed(state: dict, formats: tuple[str, ...], source: str) -> tuple[dict, str | None]:
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


def detect_format(state: dict[str, torch.Tensor]) -> str | None:
    """The format name whose marker keys appear in ``state`` (prefixes stripped), or ``None``."""
    keys = set(_strip_prefixes(dict.fromkeys(state, None)))  # type: ignore[arg-type]
    for fmt, markers in FORMAT_MARKERS.items():
        if any(m in keys for m in markers):
            return fmt
    return None


def _describe(fmt: str | None) -> str:
    return {
        WAN_TRANSFORMER_ORIGINAL: "an original-format Wan transformer",
        WAN_TRANSFORMER_DIFFUSERS: "a diffusers-format Wan transformer",
        WAN_VAE_ORIGINAL: "an original Wan VAE (Wan2.1_VAE.pth)",
        WAN_VAE_DIFFUSERS: "a diffusers-format Wan VAE",
        None: "no known format",
    }[fmt]


def convert_transformer_state_dict(state: dict[str, torch.Tensor], *, source: str = "<state dict>") -> dict:
    """Any supported transformer state dict → diffusers ``WanTransformer3DModel`` key names."""
    state = _strip_prefixes(dict(state))
    fmt = detect_format(state)
    if fmt is None:
        state, fmt = _select_prefixed(state, _TRANSFORMER_FORMATS, source)
    if fmt == WAN_TRANSFORMER_ORIGINAL:
        return convert_wan_transformer_to_diffusers(state)  # renames, norm2↔norm3 swap included
    if fmt == WAN_TRANSFORMER_DIFFUSERS:
        return state
    raise CheckpointError(
        f"{source} is {_describe(fmt)}, expected a Wan transformer (original keys such as "
        f"'head.modulation' or diffusers keys such as 'condition_embedder.time_proj.weight')"
    )


def convert_vae_state_dict(state: dict[str, torch.Tensor], *, source: str = "<state dict>") -> dict:
    """Any supported VAE state dict → diffusers ``AutoencoderKLWan`` key names."""
    state = _strip_prefixes(dict(state))
    fmt = detect_format(state)
    if fmt == WAN_VAE_ORIGINAL:
        return convert_wan_vae_to_diffusers(state)
    if fmt == WAN_VAE_DIFFUSERS:
        return state
    raise CheckpointError(
        f"{source} is {_describe(fmt)}, expected a Wan VAE (original keys such as "
        f"'{CHECKPOINT_KEY_NAMES['wan_vae']}' or diffusers keys such as 'decoder.mid_block.resnets.0.norm1.gamma')"
    )


# --------------------------------------------------------------------------------------------- building models
def _cast(model: torch.nn.Module, device: Any, dtype: torch.dtype) -> torch.nn.Module:
    """Move to ``device`` and cast the parameters to ``dtype``, ``_keep_in_fp32_modules`` to float32, buffers (RoPE
    tables) left as built: the rule diffusers' ``from_pretrained(torch_dtype=...)`` applies."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    model.to(device=device)
    for name, param in model.named_parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str, source: str, spec) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} != {tuple(expected[k].shape)})"
            )
        raise CheckpointError(
            f"{source} is not a {spec.name} {what}: {'; '.join(parts)}. Expected the {spec.name} shapes "
            f"({_shape_summary(spec, what)}); {_pull_hint(spec)}"
        )
    # assign: the checkpoint's tensors become the parameters (the model was built without storage).
    model.load_state_dict(state, strict=True, assign=True)


def _shape_summary(spec: ModelSpec, what: str) -> str:
    if what == "transformer":
        t = spec.transformer
        return f"{t['num_layers']} layers, dim {t['num_attention_heads'] * t['attention_head_dim']}, ffn {t['ffn_dim']}"
    v = spec.vae
    return f"base_dim {v['base_dim']}, z_dim {v['z_dim']}, dim_mult {v['dim_mult']}, {v['num_res_blocks']} res blocks"


def _empty_weights():
    """Build a model whose parameters have no storage (meta), buffers real: the checkpoint is assigned in, so a 14B
    model never exists twice in RAM nor spends minutes on a random init. accelerate's ``init_empty_weights``
    (what diffusers' ``from_pretrained`` uses); without accelerate, diffusers' ``no_init_weights`` (skip init only)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return no_init_weights()
    return init_empty_weights(include_buffers=False)


def _new_transformer(spec: ModelSpec) -> CausalWanTransformer3DModel:
    with _empty_weights():
        return CausalWanTransformer3DModel(**spec.transformer)


def _new_vae(spec: ModelSpec) -> AutoencoderKLWan:
    with _empty_weights():
        return AutoencoderKLWan(**spec.vae)


def load_transformer(
    spec: ModelSpec,
    state_or_path: dict[str, torch.Tensor] | str | Path,
    *,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    base: str | Path | None = None,
) -> CausalWanTransformer3DModel:
    """``CausalWanTransformer3DModel`` of ``spec`` from any supported transformer checkpoint (file, sharded index or
    state dict). ``base``: a base-model checkpoint read only if the first lacks keys (a partial generator)."""
    source = str(state_or_path) if not isinstance(state_or_path, dict) else "<state dict>"
    raw = read_checkpoint(state_or_path) if not isinstance(state_or_path, dict) else state_or_path
    state = convert_transformer_state_dict(raw, source=source)
    model = _new_transformer(spec)
    missing = set(model.state_dict()) - set(state)
    if base is not None and missing:
        logger.info("%s lacks %d keys; taking them from the base model %s", source, len(missing), base)
        base_state = convert_transformer_state_dict(read_checkpoint(base), source=str(base))
        state = {**{k: v for k, v in base_state.items() if k in missing}, **state}
    _load_strict(model, state, what="transformer", source=source, spec=spec)
    return _cast(model.eval().requires_grad_(False), device, dtype)


def load_vae(
    spec: ModelSpec,
    state_or_path: dict[str, torch.Tensor] | str | Path,
    *,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKLWan:
    """``AutoencoderKLWan`` of ``spec`` from an original ``Wan2.1_VAE.pth`` or a diffusers VAE checkpoint."""
    source = str(state_or_path) if not isinstance(state_or_path, dict) else "<state dict>"
    raw = read_checkpoint(state_or_path) if not isinstance(state_or_path, dict) else state_or_path
    state = convert_vae_state_dict(raw, source=source)
    model = _new_vae(spec)
    _load_strict(model, state, what="VAE", source=source, spec=spec)
    return _cast(model.eval().requires_grad_(False), device, dtype)


def _diffusers_weights_file(folder: Path) -> Path | None:
    """The weights of one diffusers component folder (single file or sharded index)."""
    for name in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ):
        if (folder / name).is_file():
            return folder / name
    return None


# --------------------------------------------------------------------------------------------- locating weights
@dataclass
class _Sources:
    """Where each part of a real model comes from (``None``: not found)."""

    transformer: Path | None = None
    base_transformer: Path | None = None
    vae: Path | None = None
    text_root: Path | None = None
    notes: list[str] = field(default_factory=list)


def _hub_snapshot(repo: str | None, hub_cache_dir: str | Path | None) -> Path | None:
    if not repo:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True, cache_dir=hub_cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def _hub_file(repo: str | None, filename: str | None, hub_cache_dir: str | Path | None) -> Path | None:
    if not repo or not filename:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _is_diffusers_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or any(
        (folder / part).is_dir() for part in ("transformer", "vae", "text_encoder")
    )


def _fill_from_diffusers_folder(src: _Sources, folder: Path, spec: ModelSpec) -> None:
    if src.vae is None and (folder / "vae").is_dir():
        src.vae = _diffusers_weights_file(folder / "vae")
    if src.base_transformer is None and (folder / "transformer").is_dir():
        src.base_transformer = _diffusers_weights_file(folder / "transformer")
    if src.text_root is None and (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        src.text_root = folder


def _generator_in(folder: Path, spec: ModelSpec) -> Path | None:
    for rel in (spec.generator_file, "model.pt"):
        if rel and (folder / rel).is_file():
            return folder / rel
    return None


def _locate(spec: ModelSpec, weights: Path | None, hub_cache_dir: str | Path | None) -> _Sources:
    src = _Sources()
    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.exists():
            raise CheckpointError(
                f"{weights} does not exist: expected {spec.name} weights there (a file or folder); {_pull_hint(spec)}"
            )
        if weights.is_file():
            if detect_format(dict.fromkeys(_checkpoint_keys(weights))) in _VAE_FORMATS:
                src.vae = weights
            else:
                src.transformer = weights
        else:
            src.transformer = _generator_in(weights, spec)
            if _is_diffusers_folder(weights):
                _fill_from_diffusers_folder(src, weights, spec)
            if (weights / ORIGINAL_VAE_FILE).is_file():
                src.vae = src.vae or weights / ORIGINAL_VAE_FILE
            if src.base_transformer is None:
                src.base_transformer = _diffusers_weights_file(weights)  # original Wan folder layout
            if not any((src.transformer, src.base_transformer, src.vae, src.text_root)):
                raise CheckpointError(
                    f"no {spec.name} weights found in {weights}: expected a diffusers-format folder (transformer/, "
                    f"vae/, text_encoder/, tokenizer/), an original Wan folder (diffusion_pytorch_model.safetensors, "
                    f"{ORIGINAL_VAE_FILE}) or a StreamDiffusionV2 model.pt; {_pull_hint(spec)}"
                )
    # The hub cache fills what the given weights lack.
    if src.transformer is None:
        src.transformer = _hub_file(spec.generator_repo, spec.generator_file, hub_cache_dir)
    snapshot = _hub_snapshot(spec.hub_repo, hub_cache_dir)
    if snapshot is not None:
        _fill_from_diffusers_folder(src, snapshot, spec)
    return src


# --------------------------------------------------------------------------------------------- the bundle
@dataclass
class ModelBundle:
    """A model ready for the engine: the causal DiT, the VAE weights (one ``StreamingVAE`` per session over them,
    see ``new_vae``) and the cached prompt encoder."""

    spec: ModelSpec
    transformer: CausalWanTransformer3DModel
    vae: AutoencoderKLWan
    text: PromptEncoder
    sources: dict[str, str] = field(default_factory=dict)
    """Where each part came from (for logs and ``status``)."""

    def new_vae(self, *, normalize_latents: bool = False) -> StreamingVAE:
        return StreamingVAE(self.vae, normalize_latents=normalize_latents)


def _random_bundle(spec, device, dtype, cache_dir) -> ModelBundle:
    with torch.random.fork_rng(devices=[]):  # deterministic, and the caller's RNG is left alone
        torch.manual_seed(spec.seed)
        transformer = CausalWanTransformer3DModel(**spec.transformer)
        vae = AutoencoderKLWan(**spec.vae)
    return ModelBundle(
        spec=spec,
        transformer=_cast(transformer.eval().requires_grad_(False), device, dtype),
        vae=_cast(vae.eval().requires_grad_(False), device, dtype),
        text=PromptEncoder.for_spec(spec, device=device, dtype=torch.float32, cache_dir=cache_dir),
        sources={
            "transformer": f"random (seed {spec.seed})",
            "vae": f"random (seed {spec.seed})",
            "text_encoder": f"random (seed {spec.seed})",
        },
    )


def load_model_bundle(
    name: str | ModelSpec,
    *,
    weights: str | Path | None = None,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    hub_cache_dir: str | Path | None = None,
) -> ModelBundle:
    """Build the model ``name`` (a registered name or a ``ModelSpec``) on ``device`` in ``dtype``.

    ``tiny`` (``spec.random_weights``) is made from its seed. Real models load from ``weights`` and/or the hub cache
    (module docstring); nothing is downloaded. ``cache_dir``: the prompt embedding cache (default: the user cache).
    ``hub_cache_dir``: the huggingface_hub cache (default: ``HF_HUB_CACHE``). ``progress`` gets one line per stage.
    """
    spec = name if isinstance(name, ModelSpec) else get_model_spec(name)
    say = progress or (lambda msg: None)
    if spec.random_weights:
        say(f"building {spec.name} from seed {spec.seed}")
        bundle = _random_bundle(spec, device, dtype, cache_dir)
        if weights is not None:  # trained weights of the same shapes override the seeded ones, part by part
            src = _locate(spec, Path(weights), hub_cache_dir)
            main = src.transformer or src.base_transformer
            if main is not None:
                say(f"loading the {spec.name} transformer from {main}")
                bundle.transformer = load_transformer(spec, main, device=device, dtype=dtype)
                bundle.sources["transformer"] = str(main)
            if src.vae is not None:
                say(f"loading the {spec.name} VAE from {src.vae}")
                bundle.vae = load_vae(spec, src.vae, device=device, dtype=dtype)
                bundle.sources["vae"] = str(src.vae)
        return bundle

    src = _locate(spec, Path(weights) if weights is not None else None, hub_cache_dir)
    if src.transformer is None and src.base_transformer is None:
        raise CheckpointError(
            f"the {spec.name} transformer was not found: expected the StreamDiffusionV2 generator "
            f"{spec.generator_repo}/{spec.generator_file} in the hub cache"
            + (f" or weights in {weights}" if weights else "")
            + f"; {_pull_hint(spec)}"
        )
    if src.transformer is None:
        logger.warning(
            "%s: no StreamDiffusionV2 generator found, using the base transformer %s (not distilled "
            "for few-step streaming)",
            spec.name,
            src.base_transformer,
        )
    if src.vae is None:
        raise CheckpointError(
            f"the {spec.name} VAE was not found: expected vae/diffusion_pytorch_model.safetensors of {spec.hub_repo} "
            f"in the hub cache"
            + (f" or {ORIGINAL_VAE_FILE} / vae/ in {weights}" if weights else "")
            + f"; {_pull_hint(spec)}"
        )

    main = src.transformer or src.base_transformer
    base = src.base_transformer if src.transformer is not None else None
    say(f"loading the {spec.name} transformer from {main}")
    transformer = load_transformer(spec, main, device=device, dtype=dtype, base=base)
    say(f"loading the {spec.name} VAE from {src.vae}")
    vae = load_vae(spec, src.vae, device=device, dtype=dtype)
    text_root = src.text_root

    def load_text_encoder():
        from .text import TextEncoder

        if text_root is None:
            raise CheckpointError(
                f"the {spec.name} text encoder was not found: expected text_encoder/ and tokenizer/ of "
                f"{spec.hub_repo} in the hub cache"
                + (f" or in {weights}" if weights else "")
                + f" (prompts already in the embedding cache work without it); {_pull_hint(spec)}"
            )
        say(f"loading the {spec.name} text encoder from {text_root}")
        return TextEncoder.from_spec(spec, path=text_root, device=device, dtype=dtype)

    text = PromptEncoder(
        spec.name,
        load_text_encoder,
        text_len=spec.text_len,
        text_dim=spec.text_dim,
        cache_dir=cache_dir,
        namespace=PromptEncoder.for_spec(spec, cache_dir=cache_dir).namespace,
    )
    if text_root is None:
        logger.warning("%s: no text encoder found; only prompts already in %s can be used", spec.name, text.cache_dir)
    sources = {"transformer": str(main), "vae": str(src.vae), "text_encoder": str(text_root) if text_root else "none"}
    return ModelBundle(spec=spec, transformer=transformer, vae=vae, text=text, sources=sources)


# --------------------------------------------------------------------------------------------- list / pull
@dataclass
class ModelInfo:
    """One row of ``sdlive models list``."""

    name: str
    downloaded: bool
    """All parts are on disk (always true for ``tiny``: nothing to download)."""
    location: str
    size_bytes: int
    estimated_vram_gb: float
    missing: list[str] = field(default_factory=list)


def _files_size(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += p.resolve().stat().st_size
        except OSError:
            pass
    return total


def list_models(*, hub_cache_dir: str | Path | None = None) -> list[ModelInfo]:
    """Every registered model: whether its weights are in the hub cache, where, their size and estimated VRAM."""
    infos = []
    for name in MODEL_NAMES:
        spec = get_model_spec(name)
        if spec.random_weights:
            infos.append(ModelInfo(name, True, f"built from seed {spec.seed}", 0, spec.estimated_vram_gb))
            continue
        src = _locate(spec, None, hub_cache_dir)
        missing = []
        if src.transformer is None:
            missing.append(f"{spec.generator_repo}/{spec.generator_file}")
        if src.vae is None:
            missing.append(f"{spec.hub_repo}/vae")
        if src.text_root is None:
            missing.append(f"{spec.hub_repo}/text_encoder+tokenizer")
        snapshot = _hub_snapshot(spec.hub_repo, hub_cache_dir)
        files: list[Path] = []
        if snapshot is not None:
            files += [p for part in ("vae", "text_encoder", "tokenizer") for p in (snapshot / part).glob("*")]
        if src.transformer is not None:
            files.append(src.transformer)
        location = str(snapshot) if snapshot is not None else (str(src.transformer) if src.transformer else "-")
        infos.append(ModelInfo(name, not missing, location, _files_size(files), spec.estimated_vram_gb, missing))
    return infos


@dataclass
class PullProgress:
    """A download progress event: ``file`` of ``repo`` is at ``done`` of ``total`` bytes (``total`` may be 0)."""

    repo: str
    file: str
    done: int
    total: int


def _progress_tqdm(repo: str, callback: Callable[[PullProgress], None]):
    """A tqdm class for huggingface_hub's ``tqdm_class`` that forwards byte counts to ``callback``.

    Only byte bars are forwarded (not the "Fetching N files" counter), and not the network-transfer twin of
    snapshot_download's byte bar (same bytes twice). The total may grow after creation (snapshot_download adds each
    file's size), so it is read at every update.
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Forward(hf_tqdm):
        def __init__(self, *args, **kwargs):
            name = str(kwargs.get("name") or "")
            self._forward = kwargs.get("unit") == "B" and not name.endswith(".transfer")
            self._label = str(kwargs.get("desc") or name or repo)
            self._done = int(kwargs.get("initial") or 0)
            kwargs["disable"] = True  # no terminal output (and tqdm stops counting): the caller draws its own bar
            super().__init__(*args, **kwargs)
            self._emit()

        def _emit(self) -> None:
            if self._forward:
                callback(PullProgress(repo, self._label, self._done, int(getattr(self, "total", 0) or 0)))

        def update(self, n=1):
            self._done += int(n or 0)
            self._emit()
            return super().update(n)

    return _Forward


def pull_model(
    name: str,
    *,
    progress: Callable[[PullProgress], None] | None = None,
    hub_cache_dir: str | Path | None = None,
) -> list[Path]:
    """Download ``name``'s weights into the hub cache (VAE, text encoder, tokenizer of the diffusers base repo, and
    the StreamDiffusionV2 generator). Returns the local paths. ``tiny`` needs nothing. Network errors (offline,
    ``HF_HUB_OFFLINE=1``, unknown repo) become one ``CheckpointError``."""
    spec = get_model_spec(name)
    if spec.random_weights:
        return []
    from huggingface_hub import hf_hub_download, snapshot_download

    tqdm_for = (lambda repo: _progress_tqdm(repo, progress)) if progress else (lambda repo: None)
    paths: list[Path] = []
    try:
        if spec.hub_repo:
            paths.append(
                Path(
                    snapshot_download(
                        spec.hub_repo,
                        allow_patterns=_BASE_PATTERNS,
                        cache_dir=hub_cache_dir,
                        tqdm_class=tqdm_for(spec.hub_repo),
                    )
                )
            )
        if spec.generator_repo and spec.generator_file:
            paths.append(
                Path(
                    hf_hub_download(
                        spec.generator_repo,
                        spec.generator_file,
                        cache_dir=hub_cache_dir,
                        tqdm_class=tqdm_for(spec.generator_repo),
                    )
                )
            )
    except Exception as exc:  # noqa: BLE001 - offline, auth, network: one clear error
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(
            f"cannot download {name} ({spec.hub_repo}, {spec.generator_repo}/{spec.generator_file}): {why}. "
            f"Check the network (and unset HF_HUB_OFFLINE), then run `sdlive models pull {name}` again, or copy the "
            f"weights and pass --weights PATH"
        ) from exc
    return paths
