"""Where each part of a model's weights is on disk (``locate_weights``), and which models are there (``list_models``).

Nothing is downloaded here (``hub.pull_model`` downloads). A real model's parts come from:

- ``weights=`` a diffusers-format folder (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``; a
  generator ``model.pt`` inside it, at the spec's ``generator_file`` path or top level, overrides the transformer),
  an original Wan folder (``diffusion_pytorch_model*.safetensors``, ``Wan2.1_VAE.pth``), or a single file (generator
  ``model.pt``, original or diffusers safetensors: a transformer, or a VAE when its keys say so);
- the hub cache for every part the given weights lack: the spec's diffusers base repo for VAE, text encoder and
  tokenizer, and the StreamDiffusionV2 generator for the transformer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .configs import MODEL_NAMES, ModelSpec, get_model_spec
from .errors import CheckpointError, pull_hint
from .formats import VAE_FORMATS, checkpoint_keys, detect_format
from .hub import HubCacheDir, cached_file, cached_snapshot

__all__ = ["ORIGINAL_VAE_FILE", "ModelInfo", "WeightSources", "list_models", "locate_weights"]

ORIGINAL_VAE_FILE = "Wan2.1_VAE.pth"


@dataclass
class WeightSources:
    """Where each part of a real model comes from (``None``: not found)."""

    transformer: Path | None = None
    """The StreamDiffusionV2 generator (or a transformer file given as ``weights``)."""
    base_transformer: Path | None = None
    """The base model's transformer: fills keys a partial generator lacks, or stands in when there is none."""
    vae: Path | None = None
    text_root: Path | None = None
    """A folder holding ``text_encoder/`` and ``tokenizer/``."""


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


def _is_diffusers_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or any(
        (folder / part).is_dir() for part in ("transformer", "vae", "text_encoder")
    )


def _fill_from_diffusers_folder(src: WeightSources, folder: Path) -> None:
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


def locate_weights(spec: ModelSpec, weights: Path | None, hub_cache_dir: HubCacheDir) -> WeightSources:
    """The files of ``spec``'s parts: from ``weights`` (a file or folder) first, then the hub cache (module doc).
    A ``weights`` path that does not exist, or a folder with nothing usable, is a :class:`CheckpointError`."""
    src = WeightSources()
    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.exists():
            raise CheckpointError(
                f"{weights} does not exist: expected {spec.name} weights there (a file or folder); {pull_hint(spec)}"
            )
        if weights.is_file():
            if detect_format(checkpoint_keys(weights)) in VAE_FORMATS:
                src.vae = weights
            else:
                src.transformer = weights
        else:
            src.transformer = _generator_in(weights, spec)
            if _is_diffusers_folder(weights):
                _fill_from_diffusers_folder(src, weights)
            if (weights / ORIGINAL_VAE_FILE).is_file():
                src.vae = src.vae or weights / ORIGINAL_VAE_FILE
            if src.base_transformer is None:
                src.base_transformer = _diffusers_weights_file(weights)  # original Wan folder layout
            if not any((src.transformer, src.base_transformer, src.vae, src.text_root)):
                raise CheckpointError(
                    f"no {spec.name} weights found in {weights}: expected a diffusers-format folder (transformer/, "
                    f"vae/, text_encoder/, tokenizer/), an original Wan folder (diffusion_pytorch_model.safetensors, "
                    f"{ORIGINAL_VAE_FILE}) or a StreamDiffusionV2 model.pt; {pull_hint(spec)}"
                )
    # The hub cache fills what the given weights lack.
    if src.transformer is None:
        src.transformer = cached_file(spec.generator_repo, spec.generator_file, hub_cache_dir)
    snapshot = cached_snapshot(spec.hub_repo, hub_cache_dir)
    if snapshot is not None:
        _fill_from_diffusers_folder(src, snapshot)
    return src


# --------------------------------------------------------------------------------------------- list
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


def list_models(*, hub_cache_dir: HubCacheDir = None) -> list[ModelInfo]:
    """Every registered model: whether its weights are in the hub cache, where, their size and estimated VRAM."""
    infos = []
    for name in MODEL_NAMES:
        spec = get_model_spec(name)
        if spec.random_weights:
            infos.append(ModelInfo(name, True, f"built from seed {spec.seed}", 0, spec.estimated_vram_gb))
            continue
        src = locate_weights(spec, None, hub_cache_dir)
        missing = []
        if src.transformer is None:
            missing.append(f"{spec.generator_repo}/{spec.generator_file}")
        if src.vae is None:
            missing.append(f"{spec.hub_repo}/vae")
        if src.text_root is None:
            missing.append(f"{spec.hub_repo}/text_encoder+tokenizer")
        snapshot = cached_snapshot(spec.hub_repo, hub_cache_dir)
        files: list[Path] = []
        if snapshot is not None:
            files += [p for part in ("vae", "text_encoder", "tokenizer") for p in (snapshot / part).glob("*")]
        if src.transformer is not None:
            files.append(src.transformer)
        location = str(snapshot) if snapshot is not None else (str(src.transformer) if src.transformer else "-")
        infos.append(ModelInfo(name, not missing, location, _files_size(files), spec.estimated_vram_gb, missing))
    return infos
