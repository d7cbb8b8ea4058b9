"""The ``mini`` model's shipped weights and its prompt table (``docs/mini.md``).

``mini`` is a toy-scale member of the Wan family trained on a CPU (``tools/train_mini.py``) and shipped inside the
package (``weights/mini/``): ``transformer.safetensors`` (the causal DiT), ``vae.safetensors`` (the Wan VAE at base
width 8) and ``prompts.safetensors`` (one learned embedding per style). It has no text encoder: its vocabulary is the
styles it was trained on (:mod:`.mini_styles`), and :class:`PromptTable` maps each of those prompts to its embedding.
An unknown prompt is a :class:`UnknownPrompt` error that lists the known ones.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

from .configs import ModelSpec
from .errors import CheckpointError

__all__ = ["PromptTable", "UnknownPrompt", "shipped_weights_dir"]

TRANSFORMER_FILE = "transformer.safetensors"
VAE_FILE = "vae.safetensors"
PROMPTS_FILE = "prompts.safetensors"


class UnknownPrompt(ValueError):
    """A prompt outside a prompt table's vocabulary (the message lists the known prompts)."""


def shipped_weights_dir(spec: ModelSpec) -> Path:
    """The package folder holding ``spec``'s shipped weights; a :class:`CheckpointError` when a file is missing."""
    if spec.shipped_weights is None:
        raise ValueError(f"{spec.name} has no weights inside the package")
    folder = Path(str(resources.files("sdlive.daemon.model").joinpath(spec.shipped_weights)))
    missing = [name for name in (TRANSFORMER_FILE, VAE_FILE, PROMPTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"the {spec.name} weights that ship inside sdlive are missing from {folder} ({', '.join(missing)}): "
            "the installation is incomplete; reinstall sdlive, or retrain them with `python tools/train_mini.py`"
        )
    return folder


def normalise_prompt(prompt: str) -> str:
    """The form prompts are matched in: cleaned as for Wan (``prompt_clean``), lower case, single spaces."""
    # imported here: diffusers' Wan pipeline module costs seconds, and `--model auto`'s probe imports this module
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return " ".join(prompt_clean(prompt).lower().split())


class PromptTable:
    """Prompt → embedding for a model without a text encoder: ``encode(prompt) -> [1, text_len, text_dim]``.

    The same ``encode`` as :class:`~.text.PromptEncoder` (what the engine calls), from a fixed table: the prompts
    (matched after :func:`normalise_prompt`) and their embeddings ``[n, text_len, text_dim]``.
    """

    def __init__(self, model_name: str, prompts: list[str], embeds: torch.Tensor) -> None:
        if embeds.ndim != 3 or embeds.shape[0] != len(prompts):
            raise ValueError(f"expected one [text_len, text_dim] embedding per prompt, got {tuple(embeds.shape)}")
        self.model_name = model_name
        self.prompts = list(prompts)
        """The known prompts, in table order."""
        self._rows = {normalise_prompt(p): i for i, p in enumerate(prompts)}
        self._embeds = embeds.float().cpu()

    @classmethod
    def from_file(cls, model_name: str, path: str | Path) -> PromptTable:
        """The table in a ``prompts.safetensors`` file (tensor ``embeds``, metadata ``prompts``: a JSON list)."""
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            embeds = f.get_tensor("embeds")
        try:
            prompts = json.loads(metadata["prompts"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path} has no 'prompts' list in its metadata: not a {model_name} prompt table") from exc
        return cls(model_name, prompts, embeds)

    @property
    def text_len(self) -> int:
        return int(self._embeds.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self._embeds.shape[2])

    def row(self, prompt: str) -> int:
        """The table row of ``prompt``; :class:`UnknownPrompt` (a ``ValueError``) listing the known prompts."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must not be empty")
        key = normalise_prompt(prompt)
        if key not in self._rows:
            known = ", ".join(repr(p) for p in self.prompts)
            raise UnknownPrompt(
                f"the {self.model_name} model knows only its own style prompts, not {prompt!r}: use one of {known} "
                "(the mini-* presets do); any other prompt needs a real model (`sdlive models pull wan2.1-1.3b`)"
            )
        return self._rows[key]

    def encode(self, prompt: str) -> torch.Tensor:
        """[1, text_len, text_dim] float32 on the CPU."""
        return self._embeds[self.row(prompt)].unsqueeze(0).clone()

    def is_cached(self, prompt: str) -> bool:
        """Whether ``prompt`` is in the table (a table never needs an encoder)."""
        try:
            self.row(prompt)
        except ValueError:
            return False
        return True

    def warm(self, prompts: list[str]) -> None:
        """Check every prompt (nothing to load): :class:`UnknownPrompt` for the first unknown one."""
        for prompt in prompts:
            self.row(prompt)

    def unload(self) -> None:
        """Nothing to free (no text encoder)."""
