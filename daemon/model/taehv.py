"""The light decoder: a TAEHV-style tiny decoder for Wan 2.1 latents (madebyollin's ``taew2_1``), streamed.

The architecture is TAEHV's decoder (github.com/madebyollin/taehv): convolutions at 256/128/64 channels, three
*memory blocks* per scale (each sees its input and its input one latent frame earlier), nearest 2× upsampling and
two temporal 2× *grow* layers, so one latent becomes 4 frames; the first 3 frames of a stream are alignment frames
and are dropped (so the first latent gives 1 frame, every later one 4, like the Wan VAE). It decodes what the DiT
produces as it is (no latent mean/std), to [0, 1].

:class:`TinyWanDecoder` has the module names of TAEHV's ``decoder`` Sequential, so a ``taew2_1.pth`` /
``taew2_1.safetensors`` loads into it as it is (:func:`load_tiny_decoder`, the ``encoder.*`` half ignored).
:class:`StreamingTinyDecode` runs it one latent at a time with each memory block's previous input kept: the same
frames as decoding the whole clip at once (:meth:`TinyWanDecoder.decode_video`), at a fixed cost per latent. (Upstream
StreamDiffusionV2's ``--use_taehv`` re-decodes the last 3 latents with every new one instead, and drops the first
latent's frame.)

About 10 % of the Wan VAE decoder's FLOPs at 480×832 and a few MB of state per session instead of GBs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LIGHT_DECODER_FILES", "StreamingTinyDecode", "TinyWanDecoder", "load_tiny_decoder"]

LIGHT_DECODER_FILES = ("taew2_1.safetensors", "taew2_1.pth")
"""The file names a light decoder is looked for by (madebyollin/taehv's Wan 2.1 weights)."""

_CHANNELS = (256, 128, 64, 64)
_TIME_UPSCALE = (False, True, True)


def _conv(n_in: int, n_out: int, *, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _MemBlock(nn.Module):
    """relu(conv(cat(x, x one frame earlier)) + skip(x))."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in * 2, n_out), nn.ReLU(inplace=True), _conv(n_out, n_out), nn.ReLU(inplace=True), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class _TGrow(nn.Module):
    """One frame in, ``stride`` frames out (channel groups become consecutive frames)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N·T, C, H, W] → [N·T·stride, C, H, W]."""
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class TinyWanDecoder(nn.Module):
    """TAEHV's decoder for 16-channel Wan 2.1 latents (``layers``: the Sequential a ``taew2_1`` file fills)."""

    latent_channels = 16
    frames_to_trim = 3
    """Frames at the start of a stream that only align it with the Wan VAE's (dropped)."""

    def __init__(self) -> None:
        super().__init__()
        n = _CHANNELS
        blocks: list[nn.Module] = [_Clamp(), _conv(self.latent_channels, n[0]), nn.ReLU(inplace=True)]
        for scale in range(3):
            blocks += [_MemBlock(n[scale], n[scale]) for _ in range(3)]
            blocks += [nn.Upsample(scale_factor=2), _TGrow(n[scale], 2 if _TIME_UPSCALE[scale] else 1)]
            blocks.append(_conv(n[scale], n[scale + 1], bias=False))
        blocks += [nn.ReLU(inplace=True), _conv(n[3], 3)]
        self.layers = nn.Sequential(*blocks)

    @property
    def t_upscale(self) -> int:
        return 2 ** sum(isinstance(m, _TGrow) and m.stride == 2 for m in self.layers)

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole clip at once: [B, 16, F, h, w] latents → [B, 3, 4F − 3, 8h, 8w] in [0, 1]. Every frame at each
        layer at once; a memory block's "earlier" input is its input shifted by one frame (zeros first)."""
        b, c, f, h, w = latents.shape
        x = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        for layer in self.layers:
            if isinstance(layer, _MemBlock):
                frames = x.reshape(b, -1, *x.shape[1:])
                past = F.pad(frames, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1].reshape(x.shape)
                x = layer(x, past)
            else:
                x = layer(x)
        video = x.reshape(b, -1, *x.shape[1:])[:, self.frames_to_trim :]
        return video.permute(0, 2, 1, 3, 4).clamp(0, 1)


class StreamingTinyDecode:
    """One stream's decoder state over a shared :class:`TinyWanDecoder`: ``decode`` latents as they come."""

    def __init__(self, decoder: TinyWanDecoder) -> None:
        self.decoder = decoder
        self.reset()

    def reset(self) -> None:
        self._memory: list[torch.Tensor | None] = [None] * len(self.decoder.layers)
        self._to_trim = self.decoder.frames_to_trim

    @property
    def nbytes(self) -> int:
        """Bytes of the kept state (each memory block's previous input)."""
        return sum(m.numel() * m.element_size() for m in self._memory if m is not None)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 16, F, h, w] → [B, 3, T, 8h, 8w] in [0, 1]: 4 frames per latent (the stream's first latent: 1)."""
        frames: list[torch.Tensor] = []
        for i in range(latents.shape[2]):
            self._run(latents[:, :, i], 0, frames)
        kept = frames[self._to_trim :]
        self._to_trim = max(0, self._to_trim - len(frames))
        if not kept:
            b, _, _, h, w = latents.shape
            return latents.new_zeros(b, 3, 0, h * 8, w * 8)
        return torch.stack(kept, dim=2).clamp(0, 1)

    def _run(self, x: torch.Tensor, start: int, out: list[torch.Tensor]) -> None:
        """One frame from layer ``start`` on, depth first (a grown frame's first half goes all the way first), so
        every memory block sees its frames in time order."""
        layers = self.decoder.layers
        for i in range(start, len(layers)):
            layer = layers[i]
            if isinstance(layer, _MemBlock):
                past = self._memory[i]
                self._memory[i] = x
                x = layer(x, past if past is not None else torch.zeros_like(x))
            elif isinstance(layer, _TGrow) and layer.stride > 1:
                grown = layer.conv(x)
                for part in grown.chunk(layer.stride, dim=1):
                    self._run(part, i + 1, out)
                return
            else:
                x = layer(x)
        out.append(x)


# ------------------------------------------------------------------------------------------------ loading


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_tiny_decoder(
    source: str | Path | dict[str, torch.Tensor], *, device: str | torch.device = "cpu", dtype: torch.dtype
) -> TinyWanDecoder:
    """A :class:`TinyWanDecoder` with the weights of a ``taew2_1`` file (``.pth`` or ``.safetensors``, the whole
    TAEHV state dict: its ``decoder.*`` keys are taken) or a state dict. A file that does not fit names the keys."""
    state = _read(Path(source)) if not isinstance(source, dict) else source
    what = str(source) if not isinstance(source, dict) else "the state dict"
    model = TinyWanDecoder()
    own = model.layers.state_dict()
    prefix = "decoder." if any(k.startswith("decoder.") for k in state) else ""
    picked: dict[str, Any] = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    for i, layer in enumerate(model.layers):
        key = f"{i}.conv.weight"
        if isinstance(layer, _TGrow) and key in picked and picked[key].shape[0] > own[key].shape[0]:
            picked[key] = picked[key][-own[key].shape[0] :]  # a stride-2 checkpoint layer run at stride 1: its last frame
    missing = sorted(set(own) - set(picked))
    unexpected = sorted(set(picked) - set(own))
    wrong = sorted(k for k in set(own) & set(picked) if tuple(own[k].shape) != tuple(picked[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"{what} is not a TAEHV Wan 2.1 decoder (taew2_1): missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"wrong shape {wrong[:4]}; get taew2_1.pth from github.com/madebyollin/taehv"
        )
    model.layers.load_state_dict(picked)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
