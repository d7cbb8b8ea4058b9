"""Where each part of a model's weights is on disk (``locate_weights``), and which models are there (``list_models``).

Nothing is downloaded here (``hub.pull_model`` downloads). A real model's parts come from:

- ``weights=`` one of
  - a diffusers-format folder (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``; a generator
    ``model.pt`` inside it, at the spec's ``generator_file`` path or top level, overrides the transformer);
  - upstream StreamDiffusionV2's tree, given as its root (``wan_models/`` + ``ckpts/``), as ``ckpts/`` (or the
    generator's own folder ``ckpts/wan_causal_dmd_v2v/``), or as the original Wan folder
    ``wan_models/Wan2.1-T2V-1.3B/`` (``diffusion_pytorch_model*.safetensors``, ``Wan2.1_VAE.pth``,
    ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/``): whichever of the three is given, the other half of
    the tree is found next to it;
  - a single file (generator ``model.pt``, original or diffusers safetensors: a transformer, or a VAE when its keys
    say so; inside upstream's tree, the tree's other parts fill the rest);
- the hub cache for every part the given weights lack: the spec's diffusers base repo for VAE, text encoder and
  tokenizer, and the StreamDiffusionV2 generator for the transformer.

A base transformer without a generator is reported as such (``WeightSources.transformer is None``); the bundle
refuses it unless asked (``base_only``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .configs import MODEL_NAMES, ModelSpec, get_model_spec
from .errors import CheckpointError, pull_hint
from .hub import HubCacheDir, cached_file, cached_snapshot

__all__ = [
    "ORIGINAL_T5_FILES",
    "ORIGINAL_TOKENIZER_DIR",
    "ORIGINAL_VAE_FILE",
    "UPSTREAM_BASE_DIR",
    "UPSTREAM_GENERATOR_DIR",
    "ModelInfo",
    "WeightSources",
    "list_models",
    "locate_weights",
    "upstream_base_name",
]

logger = logging.getLogger(__name__)

ORIGINAL_VAE_FILE = "Wan2.1_VAE.pth"
ORIGINAL_T5_FILES = ("models_t5_umt5-xxl-enc-bf16.pth", "models_t5_umt5-xxl-enc-bf16.safetensors")
"""The original Wan folder's UMT5 encoder (Wan's own ``T5Encoder`` key names)."""
ORIGINAL_TOKENIZER_DIR = "google/umt5-xxl"
"""The tokenizer folder inside the original Wan folder (a Hugging Face tokenizer)."""
UPSTREAM_BASE_DIR = "wan_models"
"""Upstream StreamDiffusionV2's folder of base Wan models (``wan_models/Wan2.1-T2V-1.3B/``)."""
UPSTREAM_GENERATOR_DIR = "ckpts"
"""Upstream StreamDiffusionV2's folder of distilled generators (``ckpts/wan_causal_dmd_v2v/model.pt``)."""


@dataclass
class WeightSources:
    """Where each part of a real model comes from (``None``: not found)."""

    transformer: Path | None = None
    """The StreamDiffusionV2 generator (or a transformer file given as ``weights``)."""
    base_transformer: Path | None = None
    """The base model's transformer: fills keys a partial generator lacks, or stands in when there is none."""
    vae: Path | None = None
    text_root: Path | None = None
    """A folder holding ``text_encoder/`` and ``tokenizer/`` (diffusers layout)."""
    text_encoder: Path | None = None
    """The original Wan folder's UMT5 encoder file (``models_t5_umt5-xxl-enc-bf16.pth``), used with ``tokenizer``."""
    tokenizer: Path | None = None
    """The original Wan folder's tokenizer folder (``google/umt5-xxl/``)."""

    @property
    def has_text_encoder(self) -> bool:
        return self.text_root is not None or (self.text_encoder is not None and self.tokenizer is not None)

    def any(self) -> bool:
        return any((self.transformer, self.base_transformer, self.vae, self.text_root, self.text_encoder))


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


def _fill_from_original_wan_folder(src: WeightSources, folder: Path) -> None:
    """An original Wan folder (upstream's ``wan_models/Wan2.1-T2V-1.3B/``): base transformer, VAE, UMT5, tokenizer."""
    if src.vae is None and (folder / ORIGINAL_VAE_FILE).is_file():
        src.vae = folder / ORIGINAL_VAE_FILE
    if src.base_transformer is None:
        src.base_transformer = _diffusers_weights_file(folder)
    if src.text_root is None and src.text_encoder is None:
        src.text_encoder = next((folder / n for n in ORIGINAL_T5_FILES if (folder / n).is_file()), None)
        if src.text_encoder is not None and (folder / ORIGINAL_TOKENIZER_DIR).is_dir():
            src.tokenizer = folder / ORIGINAL_TOKENIZER_DIR


def upstream_base_name(spec: ModelSpec) -> str | None:
    """The base model's folder name in upstream's ``wan_models/``: the original Wan repo's name
    (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` → ``Wan2.1-T2V-1.3B``)."""
    if not spec.hub_repo:
        return None
    name = spec.hub_repo.rsplit("/", 1)[-1]
    return name[: -len("-Diffusers")] if name.endswith("-Diffusers") else name


def _upstream_root(folder: Path) -> Path | None:
    """The root of upstream's tree that ``folder`` is, or is inside (``ckpts/``, ``ckpts/<gen>/``,
    ``wan_models/``, ``wan_models/<base>/``); ``None`` when it is not part of one."""
    folder = folder.resolve()
    if (folder / UPSTREAM_GENERATOR_DIR).is_dir() or (folder / UPSTREAM_BASE_DIR).is_dir():
        return folder
    for up in (folder, folder.parent):
        if up.name in (UPSTREAM_GENERATOR_DIR, UPSTREAM_BASE_DIR) and up.parent != up:
            return up.parent
    return None


def _upstream_base_folder(root: Path, spec: ModelSpec) -> Path | None:
    """``root/wan_models/<base>``: the spec's name, else the one original Wan folder there."""
    models = root / UPSTREAM_BASE_DIR
    if not models.is_dir():
        return None
    name = upstream_base_name(spec)
    if name and (models / name).is_dir():
        return models / name
    candidates = sorted(d for d in models.iterdir() if d.is_dir() and (d / ORIGINAL_VAE_FILE).is_file())
    return candidates[0] if len(candidates) == 1 else None


def _fill_from_folder(src: WeightSources, folder: Path, spec: ModelSpec) -> None:
    src.transformer = src.transformer or _generator_in(folder, spec)
    if _is_diffusers_folder(folder):
        _fill_from_diffusers_folder(src, folder)
    _fill_from_original_wan_folder(src, folder)


def _fill_from_upstream_tree(src: WeightSources, weights: Path, spec: ModelSpec) -> None:
    """The halves of upstream's tree that ``weights`` is not: the generator under ``ckpts/``, the base parts under
    ``wan_models/<base>/``."""
    root = _upstream_root(weights)
    if root is None:
        return
    if src.transformer is None and (root / UPSTREAM_GENERATOR_DIR).is_dir():
        src.transformer = _generator_in(root / UPSTREAM_GENERATOR_DIR, spec)
        if src.transformer is not None:
            logger.info("%s: the StreamDiffusionV2 generator of upstream's tree %s", spec.name, src.transformer)
    base = _upstream_base_folder(root, spec)
    if base is not None and base.resolve() != weights.resolve():
        _fill_from_folder(src, base, spec)


def locate_weights(spec: ModelSpec, weights: Path | None, hub_cache_dir: HubCacheDir) -> WeightSources:
    """The files of ``spec``'s parts: from ``weights`` (a file or folder) first, then the rest of upstream's tree
    when ``weights`` is part of one, then the hub cache (module doc). A ``weights`` path that does not exist, or a
    folder with nothing usable, is a :class:`CheckpointError`."""
    src = WeightSources()
    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.exists():
            raise CheckpointError(
                f"{weights} does not exist: expected {spec.name} weights there (a file or folder); {pull_hint(spec)}"
            )
        if weights.is_file():
            from .formats import VAE_FORMATS, checkpoint_keys, detect_format  # diffusers: only when a file is read

            if detect_format(checkpoint_keys(weights)) in VAE_FORMATS:
                src.vae = weights
            else:
                src.transformer = weights
            _fill_from_upstream_tree(src, weights.parent, spec)  # a file inside upstream's tree: the rest of it
        else:
            _fill_from_folder(src, weights, spec)
            _fill_from_upstream_tree(src, weights, spec)
            if not src.any():
                base = upstream_base_name(spec) or "Wan2.1-T2V-1.3B"
                gen = spec.generator_file or "wan_causal_dmd_v2v/model.pt"
                raise CheckpointError(
                    f"no {spec.name} weights found in {weights}: expected upstream StreamDiffusionV2's tree (its root "
                    f"with {UPSTREAM_BASE_DIR}/{base}/ and {UPSTREAM_GENERATOR_DIR}/{gen}, or either half), an "
                    f"original Wan folder (diffusion_pytorch_model.safetensors, {ORIGINAL_VAE_FILE}), a "
                    f"diffusers-format folder (transformer/, vae/, text_encoder/, tokenizer/) or a StreamDiffusionV2 "
                    f"model.pt; {pull_hint(spec)}"
                )
    # The hub cache fills what the given weights lack.
    if src.transformer is None:
        src.transformer = cached_file(spec.generator_repo, spec.generator_file, hub_cache_dir)
    snapshot = cached_snapshot(spec.hub_repo, hub_cache_dir)
    if snapshot is not None:
        local_text = src.has_text_encoder
        _fill_from_diffusers_folder(src, snapshot)
        if local_text and src.text_encoder is not None:
            src.text_root = None  # the given original-format encoder wins over the hub's
        elif src.text_root is not None:
            src.text_encoder = src.tokenizer = None  # one complete text encoder, not half of each
    return src


# --------------------------------------------------------------------------------------------- list
@dataclass
class ModelInfo:
    """One row of ``sdlive models list``."""

    name: str
    downloaded: bool
    """All parts are on disk (always true for ``tiny``, and for ``mini`` whose weights ship in the package)."""
    location: str
    size_bytes: int
    estimated_vram_gb: float
    missing: list[str] = field(default_factory=list)


def _shipped_info(spec: ModelSpec) -> ModelInfo:
    """``mini``: its weights ship inside the package (missing only from a broken installation)."""
    from .mini import shipped_weights_dir

    try:
        folder = shipped_weights_dir(spec)
    except CheckpointError as exc:
        return ModelInfo(spec.name, False, "-", 0, spec.estimated_vram_gb, [str(exc)])
    return ModelInfo(spec.name, True, f"inside the package ({folder})", _files_size(folder.glob("*.safetensors")),
                     spec.estimated_vram_gb)  # fmt: skip


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
        if spec.shipped_weights is not None:
            infos.append(_shipped_info(spec))
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
