"""Generation parameters, defined once: their names, types, bounds and defaults.

``GenerationParams`` is what a session generates with: the engine's ``SessionParams`` *is* this model, a preset
is a named ``StyleParams``, replies carry it, and ``StyleUpdate`` (every field optional, same types) is what
``set_params`` and ``open_session.params`` send. The bounds come from ``constants.py``, which the OBS script reads
too, so a limit changes in one place and every side agrees (``tests/protocol/test_params_contract.py``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from . import constants as c

__all__ = [
    "GenerationParams",
    "NoiseScale",
    "Prompt",
    "Seed",
    "Steps",
    "StyleParams",
    "StyleUpdate",
    "TransitionChunks",
]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("prompt must not be blank")
    return value


Prompt = Annotated[str, Field(min_length=1, max_length=c.PROMPT_MAX_CHARS), AfterValidator(_not_blank)]
Steps = Annotated[int, Field(ge=c.STEPS_MIN, le=c.STEPS_MAX)]
NoiseScale = Annotated[float, Field(gt=c.NOISE_SCALE_MIN_EXCLUSIVE, le=c.NOISE_SCALE_MAX)]
Seed = Annotated[int, Field(ge=0, lt=c.SEED_MAX_EXCLUSIVE)]
TransitionChunks = Annotated[int, Field(ge=0, le=c.TRANSITION_CHUNKS_MAX)]


class StyleParams(BaseModel):
    """The look of a stream: what a preset sets and ``set_params`` changes. Every field is validated, so a bad
    value is a clear ``ValueError``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompt: Prompt = Field(c.DEFAULT_PROMPT, description="the style prompt")
    steps: Steps = Field(c.DEFAULT_STEPS, description=f"denoising steps, {c.STEPS_MIN}–{c.STEPS_MAX}")
    noise_scale: NoiseScale = Field(c.DEFAULT_NOISE_SCALE, description="how far from the input the model may go")
    seed: Seed = Field(c.DEFAULT_SEED, description="noise seed")
    transition_chunks: TransitionChunks = Field(
        c.DEFAULT_TRANSITION_CHUNKS, description="chunks over which a prompt change blends in"
    )

    def style(self) -> dict[str, Any]:
        """The style fields only (a subclass's extra fields left out), ready for ``set_params(**style)``."""
        return {name: getattr(self, name) for name in c.STYLE_FIELDS}


class GenerationParams(StyleParams):
    """Everything a session generates with: its style plus how the engine schedules the steps."""

    stream_batch: bool = Field(
        c.DEFAULT_STREAM_BATCH, description="one batched forward per chunk (steps pipelined) vs one forward per step"
    )


class StyleUpdate(BaseModel):
    """Style fields to change; absent ones keep their value. Incoming wire data: JSON types exactly, no extras."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt | None = None
    steps: Steps | None = None
    noise_scale: NoiseScale | None = None
    seed: Seed | None = None
    transition_chunks: TransitionChunks | None = None

    def changes(self) -> dict[str, Any]:
        """The style fields this update sets (the ones present)."""
        return {name: getattr(self, name) for name in c.STYLE_FIELDS if getattr(self, name) is not None}


assert tuple(StyleParams.model_fields) == c.STYLE_FIELDS == tuple(StyleUpdate.model_fields)
assert tuple(GenerationParams.model_fields) == c.PARAM_FIELDS
