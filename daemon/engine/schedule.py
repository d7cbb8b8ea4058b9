"""Flow-matching schedule and the motion-aware noise controller (DESIGN §3, upstream.md §3–4).

The schedule is the one StreamDiffusionV2 distils for: 1000 train steps, shift 8, every lookup snapped to the nearest
grid timestep (so σ(t) ≈ t/1000). Conversions run in float64 and are cast back, never in bf16.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

NUM_TRAIN_TIMESTEPS = 1000
SHIFT = 8.0
STEP_LISTS: dict[int, tuple[int, ...]] = {
    1: (700,),
    2: (700, 500),
    3: (700, 500, 400),
    4: (700, 500, 400, 200),
}
MOTION_NORMALISER = 0.2
"""A frame-to-frame RMS difference of 0.2 (pixels in [-1, 1]) counts as full motion."""


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64)[:-1]
    sigmas = SHIFT * s / (1 + (SHIFT - 1) * s)
    return sigmas, sigmas * NUM_TRAIN_TIMESTEPS


SIGMAS, TIMESTEPS = _grid()


def timesteps_for(steps: int) -> tuple[int, ...]:
    """The distilled timestep list for 1–4 denoising steps."""
    if steps not in STEP_LISTS:
        raise ValueError(f"steps must be 1, 2, 3 or 4 (got {steps!r})")
    return STEP_LISTS[steps]


_GRIDS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _grid_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, timesteps) of the grid on ``device``, copied there once."""
    if device not in _GRIDS:
        _GRIDS[device] = (SIGMAS.to(device), TIMESTEPS.to(device))
    return _GRIDS[device]


def sigma_for(timestep: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
    """σ of the grid timestep nearest to each given timestep (float64, same shape as the input), looked up where
    the timesteps are: a tensor's device (no device→host read), the CPU for Python numbers."""
    t = timestep.to(torch.float64) if isinstance(timestep, torch.Tensor) else torch.as_tensor(timestep, dtype=torch.float64)
    sigmas, timesteps = _grid_on(t.device)
    idx = (t.reshape(-1, 1) - timesteps.reshape(1, -1)).abs().argmin(dim=1)
    return sigmas[idx].reshape(t.shape)


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [B] or scalar σ over a [B, ...] tensor."""
    sigma = sigma.to(device=like.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
    """x_t = (1 − σ_t)·x0 + σ_t·ε, with one timestep per sample (or one for all)."""
    sigma = _per_sample(sigma_for(timestep), x0)
    out = (1 - sigma) * x0.double() + sigma * noise.double()
    return out.to(x0.dtype)


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, timestep: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
    """x0 = x_t − σ_t·v for a flow (velocity) prediction v."""
    sigma = _per_sample(sigma_for(timestep), x_t)
    out = x_t.double() - sigma * flow.double()
    return out.to(x_t.dtype)


class NoiseLevel(NamedTuple):
    """How a later chunk is noised: ``strength`` s interpolates noise and input latents, ``timestep`` labels it.
    Both are 0-dim float64 tensors on the frames' device: deciding them reads nothing back to the host."""

    strength: torch.Tensor
    timestep: torch.Tensor


class NoiseController:
    """Motion-aware noise scale: more motion between frames → less noise, so fast motion keeps its structure.

    Per chunk, over the new frames and the frame before them:
    d_f = sqrt(mean((x_f − x_{f−1})²)); d = clamp(max_f d_f / 0.2, 0, 1);
    s = 0.9·(s_init − 0.1·d) + 0.1·s_prev; current_step = int(1000·s) − 100.
    The first chunk uses s_init and the fixed step list.
    """

    def __init__(self, noise_scale: float) -> None:
        self.noise_scale = float(noise_scale)
        self.previous: float | torch.Tensor | None = None

    def reset(self) -> None:
        self.previous = None

    @staticmethod
    def motion(frames: torch.Tensor) -> torch.Tensor | float:
        """d for pixels [B, C, T, H, W] in [-1, 1] whose first frame is the one before the chunk (a 0-dim float64
        tensor on their device)."""
        if frames.shape[2] < 2:
            return 0.0
        x = frames.double()
        diffs = x[:, :, 1:] - x[:, :, :-1]
        per_frame = diffs.pow(2).mean(dim=(0, 1, 3, 4)).sqrt()
        return (per_frame.max() / MOTION_NORMALISER).clamp(0.0, 1.0)

    def first(self) -> float:
        """The first chunk: s_init."""
        self.previous = self.noise_scale
        return self.noise_scale

    def update(self, frames: torch.Tensor) -> NoiseLevel:
        """(s, current_step) for a later chunk; ``frames`` holds the previous frame then the new ones. Computed on
        the frames' device in float64, the same arithmetic as upstream's Python floats (``int()`` truncation
        included: s > 0, so it is the floor)."""
        d = torch.as_tensor(self.motion(frames), dtype=torch.float64, device=frames.device)
        previous = self.noise_scale if self.previous is None else self.previous
        s = 0.9 * (self.noise_scale - 0.1 * d) + 0.1 * previous
        self.previous = s
        return NoiseLevel(s, torch.floor(1000 * s) - 100)
