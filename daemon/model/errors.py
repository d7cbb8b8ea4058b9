"""The one error a missing or unusable checkpoint raises, with the command that fixes it."""

from __future__ import annotations

from .configs import MODEL_NAMES, ModelSpec

__all__ = ["CheckpointError", "pull_hint"]


class CheckpointError(ValueError):
    """A checkpoint is missing or is not what was expected. The message names the file, the expectation and the
    command that fixes it."""


def pull_hint(spec: ModelSpec | str) -> str:
    """The fix to append to a :class:`CheckpointError` about ``spec`` (a real model name; ``wan2.1-1.3b`` when the
    name says nothing, e.g. for ``tiny`` or a test spec)."""
    name = spec.name if isinstance(spec, ModelSpec) else spec
    if name == "tiny" or name not in MODEL_NAMES:
        name = "wan2.1-1.3b"
    return f"run `sdlive models pull {name}` (or pass --weights PATH to a local copy)"
