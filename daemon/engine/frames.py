"""A session's frames between the host and the device: one copy each way, channel order and alpha on the device.

In: the uint8 frame (the daemon's shared-memory layout, ``H×W×C`` in the session's pixel format) goes to the
device as it is, through a pinned staging buffer with a non-blocking copy on CUDA (a small ring of them, each reused
only once its copy is done), and the device picks the RGB channels and scales to [-1, 1].
Out: the device puts the pixels into the pixel format (channel order, opaque alpha) and the host reads the result
in its final layout once (``StreamSession._read_back``, with the KV caches' sink decisions in the same copy).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["FrameUpload", "to_pixel_format"]

STAGING_SLOTS = 8
"""Pinned staging buffers per session (CUDA): more than a chunk's frames, so a slot comes back long done."""


class FrameUpload:
    """uint8 ``H×W×C`` frames → RGB float ``[3, H, W]`` in [-1, 1] on ``device``."""

    def __init__(self, height: int, width: int, channels: int, rgb_index: tuple[int, ...], device: torch.device):
        self.device = device
        self._rgb = torch.tensor(rgb_index, device=device)
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._next = 0
        if device.type == "cuda":
            shape = (height, width, channels)
            self._staging = [(torch.empty(shape, dtype=torch.uint8, pin_memory=True), None)
                             for _ in range(STAGING_SLOTS)]  # fmt: skip

    def __call__(self, frame: np.ndarray) -> torch.Tensor:
        """``frame`` on the device as RGB float (the caller may reuse ``frame`` at once)."""
        if frame.flags.writeable:
            host = torch.from_numpy(frame)
        else:  # a network payload's buffer: only read here, so torch's warning about writes does not apply
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                host = torch.from_numpy(frame)
        if self._staging:
            slot, done = self._staging[self._next]
            if done is not None:
                done.synchronize()  # the copy of STAGING_SLOTS frames ago: finished long since
            slot.copy_(host)
            pixels = slot.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._staging[self._next] = (slot, event)
            self._next = (self._next + 1) % len(self._staging)
        else:
            pixels = host.to(self.device)
        rgb = pixels.permute(2, 0, 1).index_select(0, self._rgb)  # [3, H, W] uint8, the RGB channels in order
        return rgb.float().div_(127.5).sub_(1.0)


def to_pixel_format(video: torch.Tensor, channels: int, rgb_index: tuple[int, ...]) -> torch.Tensor:
    """``[1, 3, T, H, W]`` in [-1, 1] → uint8 ``[T, H, W, channels]`` on the same device: RGB at ``rgb_index``,
    alpha (a 4th channel) opaque."""
    u8 = video[0].float().clamp(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)  # [3, T, H, W], in place
    frames, height, width = u8.shape[1:]
    out = torch.empty((frames, height, width, channels), dtype=torch.uint8, device=u8.device)
    for rgb, channel in enumerate(rgb_index):  # one strided copy per channel (faster than an index_put)
        out[..., channel].copy_(u8[rgb])
    if channels == 4:
        out[..., 3] = 255
    return out
