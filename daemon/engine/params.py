"""Per-session parameters: the typed, validated knobs a streamer changes live."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SessionParams(BaseModel):
    """What a session generates: every field is validated, so a bad value is a clear ``ValueError``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompt: str = Field("a cinematic film still, soft light, highly detailed", description="the style prompt")
    steps: int = Field(2, ge=1, le=4, description="denoising steps, 1–4")
    noise_scale: float = Field(0.8, gt=0.0, le=1.0, description="how far from the input the model may go")
    seed: int = Field(0, ge=0, lt=2**63)
    transition_chunks: int = Field(4, ge=0, le=64, description="chunks over which a prompt change blends")
    stream_batch: bool = Field(True, description="one batched forward per chunk (steps pipelined) vs n sequential")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value
