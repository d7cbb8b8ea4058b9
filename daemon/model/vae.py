"""Streaming Wan VAE: diffusers' ``AutoencoderKLWan`` with causal-conv feature caches that persist across calls.

DESIGN §3 "Streaming VAE". The Wan VAE's causal 3D convs look back 2 time steps; diffusers keeps those steps in a
feature cache (``feat_cache`` / ``feat_idx``) but clears it at the end of every ``encode``/``decode`` call. Here the
cache lives on the ``StreamingVAE`` (one per session) and survives between calls, so a clip fed chunk by chunk gives
exactly what the whole clip gives in one call:

- encode: the first frame alone, then groups of 4 frames (first call 5 frames → 2 latents, later 4 frames → 1);
- decode: one latent at a time (first latent → 1 frame, then 4 frames per latent), clamped to [-1, 1].

On CPU the encoder/decoder modules are switched in place to numerically equivalent fast kernels (see
``accelerate_wan_vae``): PyTorch's conv heuristic sends the thin batch-1 3D convs of the Wan VAE to its slow im2col
kernel, and ``F.normalize`` over the channel dim of a channels-first 5D tensor is a strided reduction.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    AutoencoderKLWan,
    WanCausalConv3d,
    WanRMS_norm,
    patchify,
    unpatchify,
)

from .configs import DEFAULT_COMPAT, Compat, check_compat
from .taehv import StreamingTinyDecode, TinyWanDecoder

__all__ = ["StreamingVAE", "accelerate_wan_vae"]

_TEMPORAL_GROUP = 4
"""Pixel frames per latent frame after the first (Wan VAE: ×4 in time, first frame alone)."""


class _FastWanCausalConv3d(WanCausalConv3d):
    """``WanCausalConv3d`` with the same math, run through oneDNN on CPU.

    PyTorch's ``use_mkldnn`` heuristic skips oneDNN for batch-1 inputs with few channels (N·C·T·H ≤ 20480, e.g.
    [1, 4, 6, 258, 258]) and falls back to ``slow_conv3d_forward``: 41 ms instead of 3 ms for the tiny VAE's
    full-resolution conv on 2 cores. Spatial zero padding goes into the kernel call instead of an ``F.pad`` copy; the
    causal time padding (or the cached frames) is still concatenated in front, as upstream does.
    """

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if not compiling and (not _use_onednn(x) or (torch.is_grad_enabled() and self.weight.requires_grad)):
            return super().forward(x, cache_x)  # off CPU, or training: the stock path
        # self._padding = (w, w, h, h, 2·t, 0): spatial padding is symmetric (ints; typed as Conv3d's str | int).
        causal_padding = cast(tuple[int, int, int, int, int, int], self._padding)
        pad_t = causal_padding[4]
        if cache_x is not None and pad_t > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            pad_t -= cache_x.shape[2]
        if pad_t > 0:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        padding = [0, causal_padding[2], causal_padding[0]]
        if compiling and not _use_onednn(x):
            return F.conv3d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        # Traced, the conv is the custom op; eager, its body directly (the op's dispatch costs ~0.1 ms per call).
        conv = onednn_conv3d if compiling else _onednn_conv3d
        return conv(x, self.weight, self.bias, padding, list(self.stride), list(self.dilation), self.groups)


class _FastWanRMSNorm(WanRMS_norm):
    """``WanRMS_norm`` as x·rsqrt(max(Σx², eps²)): one fused reduction instead of ``F.normalize``'s strided norm
    (16 ms → 0.5 ms on [1, 4, 4, 256, 256]); equal to ``F.normalize`` (eps 1e-12) to float rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if self.channel_first else -1
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normalized = (xf * torch.rsqrt(xf.square().sum(dim=dim, keepdim=True).clamp_min(1e-24))).to(x.dtype)
        out = normalized * (self.gamma * self.scale)  # one pass over x instead of two
        # bias=False stores the float 0.0: adding it would be one more full pass for nothing.
        return out + self.bias if isinstance(self.bias, torch.Tensor) else out


def _onednn_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: list[int],
    stride: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """3D convolution by oneDNN in channels-last (NDHWC) layout.

    Channels-last is oneDNN's native layout: 3.4 → 2.1 ms for [1, 4, 6, 256, 256] 4→4 channels, and the elementwise
    ops and norms between convs keep the layout, so there is no reorder per call."""
    cl = torch.channels_last_3d
    out = torch.ops.aten.mkldnn_convolution(
        x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl), bias, padding, stride, dilation, groups
    )
    return out.contiguous(memory_format=cl)


onednn_conv3d = torch.library.custom_op("sdlive::onednn_conv3d", _onednn_conv3d, mutates_args=())
""":func:`_onednn_conv3d` as one opaque op for a compiled VAE: aten's ``mkldnn_convolution`` has no shape function,
and inductor's own conv choice for these thin batch-1 convs takes the slow path."""


@onednn_conv3d.register_fake
def _onednn_conv3d_shape(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: list[int],
    stride: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """The output of :func:`onednn_conv3d` without computing it (for tracing)."""
    shape = F.conv3d(x, weight, bias, stride, padding, dilation, groups).shape
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)


def _use_onednn(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or not _ONEDNN_AVAILABLE:
        return False
    # torch.backends' flags are opaque to dynamo (a graph break per conv): traced, the flag is not consulted.
    return torch.compiler.is_compiling() or bool(torch.backends.mkldnn.enabled)


_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available()


def accelerate_wan_vae(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """Switch ``vae``'s causal convs and RMS norms in place to the fast, numerically equivalent forms above.

    Only the classes change (parameters, names and state dict stay as they are); idempotent. Off CPU the convs use
    the stock path, so this is harmless on GPU.
    """
    for module in vae.modules():
        if type(module) is WanCausalConv3d:
            module.__class__ = _FastWanCausalConv3d
        elif type(module) is WanRMS_norm:
            module.__class__ = _FastWanRMSNorm
    return vae


class StreamingVAE:
    """Chunk-by-chunk encode/decode with the Wan VAE, equal to whole-clip ``AutoencoderKLWan`` encode/decode.

    Several ``StreamingVAE`` may share one ``AutoencoderKLWan`` (weights); each holds its own feature caches.
    ``normalize_latents=False`` reproduces StreamDiffusionV2: ``encode`` returns the raw latent mean μ, while
    ``decode`` always applies z·std+mean first (DESIGN §3, upstream quirk). ``True`` returns (μ−mean)/std.

    ``compat="upstream"`` (default) un-normalises ``decode``'s input latents as upstream's ``stream_decode_to_pixel``
    does, rounded to bf16 whatever the run's dtype (the distilled weights were tuned with it: see
    :func:`~.configs.check_compat` and :meth:`unnormalize`); ``"clean"`` un-normalises the float32 latents as given.
    """

    def __init__(
        self,
        vae: AutoencoderKLWan,
        *,
        normalize_latents: bool = False,
        accelerate: bool = True,
        compat: Compat = DEFAULT_COMPAT,
        light_decoder: TinyWanDecoder | None = None,
    ) -> None:
        self.compat: Compat = check_compat(compat)
        self.light_decoder = light_decoder
        """The light decoder (``--decoder light``) that decodes instead of the Wan VAE's decoder, or None."""
        self._light = StreamingTinyDecode(light_decoder) if light_decoder is not None else None
        self.vae = accelerate_wan_vae(vae) if accelerate else vae
        self.normalize_latents = normalize_latents
        param = next(vae.parameters())
        self.device = param.device
        self.dtype = param.dtype
        config = vae.config
        self._z_dim: int = config["z_dim"]
        self._patch_size: int | None = config["patch_size"]
        shape = (1, self._z_dim, 1, 1, 1)
        self._mean = torch.tensor(config["latents_mean"], device=self.device, dtype=torch.float32).view(shape)
        self._std = torch.tensor(config["latents_std"], device=self.device, dtype=torch.float32).view(shape)
        # Same counts diffusers' clear_cache() uses; the lists are ours, so sessions sharing the VAE don't mix.
        self._enc_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())
        self._dec_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the stream: the next ``encode`` starts with a lone first frame, the next ``decode`` likewise."""
        # Per causal conv: its cached last frames (diffusers also stores the marker string "Rep" there).
        self._enc_feat_map: list[torch.Tensor | str | None] = [None] * self._enc_convs
        self._dec_feat_map: list[torch.Tensor | str | None] = [None] * self._dec_convs
        if self._light is not None:
            self._light.reset()
        self.frames_encoded = 0
        self.latents_decoded = 0

    # ----------------------------------------------------------------- encode
    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] pixels in [-1, 1] → [B, 16, F, H/8, W/8] latents (float32).

        First call after ``reset``: T = 1 + 4k (k ≥ 0) → 1 + k latents; later calls: T = 4k (k ≥ 1) → k latents.
        """
        if frames.ndim != 5:
            raise ValueError(f"expected frames [B, 3, T, H, W], got shape {tuple(frames.shape)}")
        num_frames = frames.shape[2]
        first = self.frames_encoded == 0
        lead = 1 if first else 0
        if num_frames < lead or (num_frames - lead) % _TEMPORAL_GROUP or (not first and num_frames == 0):
            want = "1 + 4k frames (5 for the first chunk)" if first else "a multiple of 4 frames"
            raise ValueError(f"streaming VAE encode needs {want} in this call, got {num_frames}")
        x = frames.to(device=self.device, dtype=self.dtype)
        if self._patch_size is not None:
            x = patchify(x, patch_size=self._patch_size)
        outs = []
        if first:
            outs.append(self._run_encoder(x[:, :, :1]))
        for start in range(lead, num_frames, _TEMPORAL_GROUP):
            outs.append(self._run_encoder(x[:, :, start : start + _TEMPORAL_GROUP]))
        self.frames_encoded += num_frames
        h = self.vae.quant_conv(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
        mu = h[:, : self._z_dim].float().contiguous()  # the posterior's mode; no sampling
        if self.normalize_latents:
            mu = (mu - self._mean) / self._std
        return mu

    def _run_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encoder(x, feat_cache=self._enc_feat_map, feat_idx=[0])

    # ----------------------------------------------------------------- decode
    def unnormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder's input from the DiT's latents: ``"clean"`` z·std+mean in float32; ``"upstream"`` as
        upstream's ``stream_decode_to_pixel`` does it: z rounded to bf16, then z / (1/std) + mean with the scale in
        the latents' dtype and torch's type promotion (float32 in an fp32 run, bf16 in a bf16 one)."""
        if self.compat == "upstream":
            inverse_std = 1.0 / self._std.to(latents.dtype)
            return latents.to(torch.bfloat16) / inverse_std + self._mean.to(latents.dtype)
        return latents.to(torch.float32) * self._std + self._mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 16, F, h, w] latents → [B, 3, T, 8h, 8w] pixels in [-1, 1] (float32).

        Un-normalises first (:meth:`unnormalize`). The first
        latent after ``reset`` gives 1 frame, every later latent 4.
        """
        if latents.ndim != 5 or latents.shape[1] != self._z_dim:
            raise ValueError(
                f"expected latents [B, {self._z_dim}, F, h, w], got shape {tuple(latents.shape)}"
            )
        if latents.shape[2] == 0:
            raise ValueError("streaming VAE decode needs at least one latent frame")
        if self._light is not None:
            # The light decoder takes the DiT's latents as they are (no mean/std: TAEHV's convention), to [0, 1].
            assert self.light_decoder is not None
            weight = next(self.light_decoder.parameters())
            frames = self._light.decode(latents.to(device=weight.device, dtype=weight.dtype))
            self.latents_decoded += latents.shape[2]
            return (frames.float() * 2 - 1).clamp_(-1.0, 1.0).contiguous()
        z = self.unnormalize(latents.to(device=self.device))
        x = self.vae.post_quant_conv(z.to(self.dtype))
        outs = []
        for i in range(x.shape[2]):
            first = self.latents_decoded == 0
            outs.append(
                self.vae.decoder(x[:, :, i : i + 1], feat_cache=self._dec_feat_map, feat_idx=[0], first_chunk=first)
            )
            self.latents_decoded += 1
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        if self._patch_size is not None:
            out = unpatchify(out, patch_size=self._patch_size)
        return out.float().clamp_(-1.0, 1.0).contiguous()


def _benchmark() -> None:
    """``python -m sdlive.daemon.model.vae [--size 256] [--chunks 10] [--model tiny] [--stock]``: streaming
    encode/decode ms per frame (steady state: 4-frame chunks after the first 5-frame chunk)."""
    import argparse
    import time

    from .configs import get_model_spec

    parser = argparse.ArgumentParser(description=_benchmark.__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--stock", action="store_true", help="diffusers' kernels (no oneDNN / fused norm)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    svae = StreamingVAE(AutoencoderKLWan(**get_model_spec(args.model).vae).eval(), accelerate=not args.stock)
    size = args.size
    svae.decode(svae.encode(torch.rand(1, 3, 5, size, size) * 2 - 1))
    enc = dec = 0.0
    for _ in range(args.chunks):
        chunk = torch.rand(1, 3, 4, size, size) * 2 - 1
        t0 = time.perf_counter()
        z = svae.encode(chunk)
        t1 = time.perf_counter()
        svae.decode(z)
        t2 = time.perf_counter()
        enc, dec = enc + t1 - t0, dec + t2 - t1
    frames = 4 * args.chunks
    print(
        f"{args.model} VAE {size}x{size} {'stock' if args.stock else 'accelerated'} ({torch.get_num_threads()} "
        f"threads): encode {1000 * enc / frames:.1f} ms/frame, decode {1000 * dec / frames:.1f} ms/frame, "
        f"total {1000 * (enc + dec) / frames:.1f} ms/frame"
    )


if __name__ == "__main__":
    _benchmark()
