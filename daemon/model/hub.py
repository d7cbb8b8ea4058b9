"""The Hugging Face hub: finding a model's files in the local hub cache, and downloading them (``pull_model``).

Only ``pull_model`` touches the network; the cache lookups are ``local_files_only``. ``hub_cache_dir`` is the
huggingface_hub cache (default: ``HF_HUB_CACHE``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub.utils import tqdm as hf_tqdm

from .configs import get_model_spec
from .errors import CheckpointError

__all__ = ["BASE_PATTERNS", "PullProgress", "cached_file", "cached_snapshot", "pull_model"]

HubCacheDir = str | Path | None

# What `pull_model` fetches from the diffusers base repo: the StreamDiffusionV2 generator replaces its transformer.
BASE_PATTERNS = ["model_index.json", "vae/*", "text_encoder/*", "tokenizer/*", "transformer/config.json"]


# --------------------------------------------------------------------------------------------- the cache
def cached_snapshot(repo: str | None, hub_cache_dir: HubCacheDir) -> Path | None:
    """The folder of ``repo``'s cached revision, or ``None`` (no repo, or nothing cached)."""
    if not repo:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True, cache_dir=hub_cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def cached_file(repo: str | None, filename: str | None, hub_cache_dir: HubCacheDir) -> Path | None:
    """``filename`` of ``repo`` in the cache, or ``None``."""
    if not repo or not filename:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


# --------------------------------------------------------------------------------------------- downloading
@dataclass
class PullProgress:
    """A download progress event: ``file`` of ``repo`` is at ``done`` of ``total`` bytes (``total`` may be 0)."""

    repo: str
    file: str
    done: int
    total: int


def _progress_tqdm(repo: str, callback: Callable[[PullProgress], None]) -> type[hf_tqdm]:
    """A tqdm class for huggingface_hub's ``tqdm_class`` that forwards byte counts to ``callback``.

    Only byte bars are forwarded (not the "Fetching N files" counter), and not the network-transfer twin of
    snapshot_download's byte bar (same bytes twice). The total may grow after creation (snapshot_download adds each
    file's size), so it is read at every update.
    """

    class _Forward(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
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

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            self._emit()
            return super().update(n)

    return _Forward


def pull_model(
    name: str,
    *,
    progress: Callable[[PullProgress], None] | None = None,
    hub_cache_dir: HubCacheDir = None,
) -> list[Path]:
    """Download ``name``'s weights into the hub cache (VAE, text encoder, tokenizer of the diffusers base repo, and
    the StreamDiffusionV2 generator). Returns the local paths. ``tiny`` needs nothing. Network errors (offline,
    ``HF_HUB_OFFLINE=1``, unknown repo) become one ``CheckpointError``."""
    spec = get_model_spec(name)
    if spec.random_weights:
        return []
    from huggingface_hub import hf_hub_download, snapshot_download

    def tqdm_for(repo: str) -> type[hf_tqdm] | None:
        return _progress_tqdm(repo, progress) if progress else None

    paths: list[Path] = []
    try:
        if spec.hub_repo:
            paths.append(
                Path(
                    snapshot_download(
                        spec.hub_repo,
                        allow_patterns=BASE_PATTERNS,
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
