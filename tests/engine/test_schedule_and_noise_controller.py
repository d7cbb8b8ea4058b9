"""The flow-matching schedule and the motion-aware noise controller match DESIGN §3 on hand-computed cases."""

import math

import pytest
import torch

from sdlive.daemon.engine.schedule import (
    NoiseController,
    add_noise,
    flow_to_x0,
    sigma_for,
    timesteps_for,
)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [(1, (700,)), (2, (700, 500)), (3, (700, 500, 400)), (4, (700, 500, 400, 200))],
)
def test_step_lists_are_upstreams(steps, expected):
    assert timesteps_for(steps) == expected


@pytest.mark.parametrize("steps", [0, 5, -1, 2.5])
def test_step_count_outside_1_to_4_is_a_value_error(steps):
    with pytest.raises(ValueError, match="steps must be 1, 2, 3 or 4"):
        timesteps_for(steps)


def test_sigma_snaps_to_the_nearest_shifted_grid_timestep():
    # Grid: s = linspace(1, 0, 1001)[:-1], σ = 8s / (1 + 7s). Hand-check t = 700: the grid point nearest 700.
    s = torch.linspace(1, 0, 1001, dtype=torch.float64)[:-1]
    grid = 8 * s / (1 + 7 * s)
    nearest = grid[(grid * 1000 - 700).abs().argmin()]
    assert sigma_for(700).item() == pytest.approx(nearest.item())
    assert abs(sigma_for(700).item() - 0.7) < 2e-3  # σ(t) ≈ t/1000
    assert sigma_for(1000).item() == pytest.approx(1.0)
    assert sigma_for([700, 500]).shape == (2,)


def test_add_noise_interpolates_with_sigma_per_sample():
    x0 = torch.ones(2, 16, 1, 2, 2)
    eps = torch.full_like(x0, 3.0)
    out = add_noise(x0, eps, [700, 200])
    s0, s1 = sigma_for(700).item(), sigma_for(200).item()
    assert torch.allclose(out[0], torch.full_like(out[0], (1 - s0) * 1 + s0 * 3))
    assert torch.allclose(out[1], torch.full_like(out[1], (1 - s1) * 1 + s1 * 3))


def test_flow_to_x0_inverts_the_flow_of_a_known_clean_sample():
    torch.manual_seed(0)
    x0 = torch.randn(3, 16, 1, 4, 4)
    eps = torch.randn_like(x0)
    t = [700, 500, 400]
    x_t = add_noise(x0, eps, t)
    v = eps - x0  # the flow the model is trained to predict
    assert torch.allclose(flow_to_x0(x_t, v, t), x0, atol=1e-5)


def test_first_chunk_uses_the_initial_noise_scale():
    ctl = NoiseController(0.8)
    assert ctl.first() == 0.8


def test_static_frames_keep_the_initial_scale_and_step_700():
    ctl = NoiseController(0.8)
    ctl.first()
    frames = torch.zeros(1, 3, 5, 8, 8)
    s, step = ctl.update(frames)
    assert s == pytest.approx(0.8)
    assert step == 700


def test_motion_lowers_the_noise_with_the_documented_formula():
    ctl = NoiseController(0.8)
    ctl.first()
    # previous frame 0, then frames that jump by 0.1 everywhere: d_f = 0.1 for the first diff, 0 after.
    frames = torch.zeros(1, 3, 5, 8, 8)
    frames[:, :, 1:] = 0.1
    d = min(0.1 / 0.2, 1.0)
    expected = 0.9 * (0.8 - 0.1 * d) + 0.1 * 0.8
    s, step = ctl.update(frames)
    assert s == pytest.approx(expected)
    assert step == int(1000 * s) - 100  # truncation, as upstream: 654 or 655 depending on the last bit of s
    assert step in (654, 655)
    # the next chunk blends with the previous s
    s2, _ = ctl.update(torch.zeros(1, 3, 5, 8, 8))
    assert s2 == pytest.approx(0.9 * 0.8 + 0.1 * expected)


def test_motion_is_clamped_to_one():
    frames = torch.zeros(1, 3, 2, 4, 4)
    frames[:, :, 1] = 2.0  # RMS diff 2.0 ≫ 0.2
    assert NoiseController.motion(frames) == 1.0
    ctl = NoiseController(0.8)
    ctl.first()
    s, step = ctl.update(frames)
    assert s == pytest.approx(0.9 * 0.7 + 0.08)
    assert step == int(1000 * s) - 100


def test_motion_takes_the_largest_frame_difference():
    frames = torch.zeros(1, 1, 4, 2, 2)
    frames[:, :, 2] = 0.05
    frames[:, :, 3] = -0.05  # diffs: 0, 0.05, 0.1
    assert NoiseController.motion(frames) == pytest.approx(math.sqrt(0.1**2) / 0.2)
