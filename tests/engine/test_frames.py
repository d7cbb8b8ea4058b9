"""engine.frames: a frame in each pixel format to RGB [-1, 1] on the device and back, against numpy's reading of
the same bytes (the channel order and alpha are done on the device now)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlive.daemon.engine.frames import FrameUpload, to_pixel_format
from sdlive.daemon.protocol.constants import PIXEL_FORMATS


@pytest.mark.parametrize("pixel_format", sorted(PIXEL_FORMATS))
def test_a_frame_goes_up_as_rgb_and_comes_back_in_its_format(pixel_format):
    info = PIXEL_FORMATS[pixel_format]
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (48, 64, info.bytes_per_pixel), dtype=np.uint8)
    upload = FrameUpload(48, 64, info.bytes_per_pixel, info.rgb_index, torch.device("cpu"))

    rgb = upload(frame)
    expected = frame[:, :, list(info.rgb_index)].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    assert rgb.shape == (3, 48, 64) and rgb.dtype == torch.float32
    np.testing.assert_array_equal(rgb.numpy(), expected)

    back = to_pixel_format(rgb[None, :, None], info.bytes_per_pixel, info.rgb_index)  # [1, 3, T=1, H, W]
    assert back.shape == (1, 48, 64, info.bytes_per_pixel) and back.dtype == torch.uint8
    if info.bytes_per_pixel == 4:
        assert (back[..., 3] == 255).all()
        np.testing.assert_array_equal(back[0, ..., :3].numpy(), frame[..., :3])
    else:
        np.testing.assert_array_equal(back[0].numpy(), frame)


def test_out_of_range_pixels_clamp_and_round():
    video = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 7.0]).view(1, 1, 1, 1, 6).expand(1, 3, 1, 1, 6)
    out = to_pixel_format(video, 3, (2, 1, 0))
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]  # 127.5 rounds half to even: 128
