"""Train ``mini`` on this CPU from offline data: ``python tools/train_mini.py --run runs/mini``.

Stages, each checkpointed (every ``--checkpoint-s`` seconds and at its end) and resumable (run the same command
again after an interruption: a finished stage is skipped, an unfinished one continues from its checkpoint):

1. ``vae``: the mini VAE (diffusers' Wan2.2-style residual ``AutoencoderKLWan``: 2×2 patchify, base width 16) on
   still images and 9-frame clips (alternating steps; 64×64 crops for the first 85 % of the steps, then 128×128)
   made from scikit-image's sample images (camera motion and moving objects, ``tools/mini_data.py``), MSE + L1,
   AdamW with a cosine decay.
   Its latents are then normalised per channel (folded into ``quant_conv``/``post_quant_conv``, so the shipped
   VAE's ``latents_mean``/``latents_std`` are 0/1 and the engine's upstream quirk of feeding raw μ is harmless).
2. ``clips`` + ``cache``: clips and their style targets (``sdlive.daemon.model.mini_styles``, every style per
   clip) encoded once by the trained VAE into latents (``cache.pt``).
3. ``dit``: the causal DiT and one prompt embedding per style, on the cached latents, as the engine runs it:
   chunks of latent frames (the first chunk 2 latent frames, then 1) under a block-causal mask, which equals the
   streaming KV cache while the context fits in it; each chunk noised as the engine noises it (the motion-aware
   controller's ``s·ε + (1−s)·z`` labelled ``int(1000 s) − 100``, the first chunk labelled 700, and the later
   steps' re-noised estimates at 500/400/200), the loss on the x0 the engine computes (``x_t − σ·v``). A step
   shows each clip in several styles with the same noise, and the loss weights the style-specific part of the error
   (``style_weighted_loss``), so the prompts are not drowned by the content the styles share.
4. ``export``: safetensors into ``daemon/model/weights/mini/`` (``--export``) and ``train_log.json``.

Every random draw comes from ``--seed`` (per stage and step), so a rerun with the same step counts gives the same
weights. The run records each stage's seconds in ``state.json``; ``--max-total-min`` (default 60) caps them all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mini_data import make_clip, train_images  # noqa: E402

from sdlive.daemon.model.configs import get_model_spec  # noqa: E402
from sdlive.daemon.model.mini_styles import style_names, stylize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPORT = ROOT / "daemon" / "model" / "weights" / "mini"


# ----------------------------------------------------------------------------------------------- run state
class Run:
    """A run folder: ``state.json`` (stage status, seconds spent, steps) and the stages' checkpoints."""

    def __init__(self, path: Path, seed: int, max_total_s: float) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.state_file = path / "state.json"
        self.state: dict[str, Any] = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        if self.state.setdefault("seed", seed) != seed:
            raise SystemExit(f"{path} was started with seed {self.state['seed']}, not {seed}: use another --run")
        self.state.setdefault("stages", {})
        self.max_total_s = max_total_s

    def stage(self, name: str) -> dict[str, Any]:
        return self.state["stages"].setdefault(name, {"done": False, "seconds": 0.0, "steps": 0})

    def total_seconds(self) -> float:
        return sum(s["seconds"] for s in self.state["stages"].values())

    def save(self) -> None:
        """Write the state; stages another process (a stage run beside this one) recorded meanwhile are kept."""
        on_disk = json.loads(self.state_file.read_text()) if self.state_file.exists() else {"stages": {}}
        mine = self.state["stages"]
        for name, stage in on_disk.get("stages", {}).items():
            if name not in mine or (stage["done"] and not mine[name]["done"]):
                mine[name] = stage
        tmp = self.state_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.state_file)


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _rng(seed: int, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step])


def _to_tensor(clips: np.ndarray) -> torch.Tensor:
    """[B, T, H, W, 3] uint8 → [B, 3, T, H, W] float in [-1, 1]."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


class Budget:
    """Stops a stage at its step count, its own minutes or the run's total, whichever comes first."""

    def __init__(self, run: Run, name: str, steps: int, minutes: float) -> None:
        self.run, self.name, self.steps = run, name, steps
        self.st = run.stage(name)
        self.start = time.monotonic()
        self.base = self.st["seconds"]
        self.limit = minutes * 60

    def tick(self) -> None:
        self.st["seconds"] = self.base + time.monotonic() - self.start

    def over(self) -> bool:
        self.tick()
        total = self.run.total_seconds()
        return self.st["steps"] >= self.steps or self.st["seconds"] >= self.limit or total >= self.run.max_total_s


# ----------------------------------------------------------------------------------------------- stage 1: VAE
def build_vae(spec_vae: dict[str, Any]) -> torch.nn.Module:
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    return AutoencoderKLWan(**spec_vae)


def vae_roundtrip(vae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-clip encode (μ) → decode, as the streaming VAE does chunk by chunk, but without diffusers' final clamp
    to [-1, 1] (it would stop the gradient of every pixel the young decoder overshoots)."""
    mu = vae.encode(x).latent_dist.mode()
    vae.clear_cache()
    z = vae.post_quant_conv(mu)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(z[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0))
    vae.clear_cache()
    out = torch.cat(outs, dim=2)
    if vae.config.patch_size is not None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out, mu


def vae_batch(seed: int, step: int, batch: int, size: int, frames: int) -> torch.Tensor:
    rng = _rng(seed, 1, step)
    names = train_images()
    clips = [make_clip(str(rng.choice(names)), frames, size, rng, motion=float(rng.uniform(0, 2))) for _ in range(batch)]
    return _to_tensor(np.stack(clips))


def stage_vae(run: Run, args: argparse.Namespace) -> None:
    st = run.stage("vae")
    if st["done"]:
        return
    spec = get_model_spec("mini")
    torch.manual_seed(args.seed)
    vae = build_vae(spec.vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt = run.path / "vae.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        print(f"vae: resuming at step {st['steps']}", flush=True)
    budget = Budget(run, "vae", args.vae_steps, args.vae_minutes)
    last_ckpt = time.monotonic()
    vae.train()
    losses: list[float] = []
    while not budget.over():
        step = st["steps"]
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.vae_steps, args.vae_lr)
        # Even steps: 16 still images (the first-frame path); odd steps: 2 clips of 9 frames (first frame, then two
        # 4-frame groups through the causal caches: the path every later chunk of a stream takes).
        # The first --vae-small-frac of the steps on 64×64 crops (4× the steps per second: the early phase needs
        # steps), the rest at --vae-size.
        size = 64 if step < args.vae_small_frac * args.vae_steps else args.vae_size
        if step % 2 == 0:
            x = vae_batch(args.seed, step, 4 * args.vae_batch, size, 1)
        else:
            x = vae_batch(args.seed, step, args.vae_batch // 2, size, 9)
        y, mu = vae_roundtrip(vae, x)
        mse = F.mse_loss(y, x)
        loss = mse + 0.5 * F.l1_loss(y, x) + 1e-4 * mu.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(mse.item())
        st["steps"] = step + 1
        if st["steps"] % 20 == 0:
            psnr = 10 * math.log10(4 / max(np.mean(losses[-20:]), 1e-10))
            print(f"vae step {st['steps']} mse {np.mean(losses[-20:]):.5f} (psnr {psnr:.2f} dB) "
                  f"{budget.st['seconds']:.0f} s", flush=True)  # fmt: skip
        if time.monotonic() - last_ckpt > args.checkpoint_s:
            budget.tick()
            _save({"model": vae.state_dict(), "opt": opt.state_dict()}, ckpt)
            run.save()
            last_ckpt = time.monotonic()
    budget.tick()
    vae.eval()
    stats = latent_stats(vae, args.seed)
    _save({"model": vae.state_dict(), "opt": opt.state_dict(), "latent_mean": stats[0], "latent_std": stats[1]}, ckpt)
    st["done"] = True
    st["final_mse"] = float(np.mean(losses[-50:])) if losses else None
    budget.tick()
    run.save()
    print(f"vae done: {st['steps']} steps, {st['seconds']:.0f} s", flush=True)


@torch.no_grad()
def latent_stats(vae: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of μ over 16 fresh training clips."""
    mus = [vae.encode(vae_batch(seed, 10_000_000 + i, 4, 128, 9)).latent_dist.mode() for i in range(4)]
    mu = torch.cat([m.transpose(0, 1).flatten(1) for m in mus], dim=1)
    return mu.mean(dim=1), mu.std(dim=1).clamp_min(1e-3)


def normalised_vae_state(vae_ckpt: dict[str, Any], z_dim: int) -> dict[str, torch.Tensor]:
    """The VAE state with (μ − mean)/std folded into ``quant_conv`` and z·std + mean into ``post_quant_conv``."""
    state = {k: v.clone() for k, v in vae_ckpt["model"].items()}
    mean, std = vae_ckpt["latent_mean"], vae_ckpt["latent_std"]
    w, b = state["quant_conv.weight"], state["quant_conv.bias"]  # [2z, 2z, 1, 1, 1]
    w[:z_dim] /= std.view(-1, 1, 1, 1, 1)
    b[:z_dim] = (b[:z_dim] - mean) / std
    pw, pb = state["post_quant_conv.weight"], state["post_quant_conv.bias"]  # [z, z, 1, 1, 1]: x_in = z·std + mean
    pb += (pw[:, :, 0, 0, 0] @ mean)
    pw *= std.view(1, -1, 1, 1, 1)
    return state


def load_trained_vae(run: Run) -> Any:
    spec = get_model_spec("mini")
    vae = build_vae(spec.vae)
    vae.load_state_dict(normalised_vae_state(torch.load(run.path / "vae.pt", weights_only=False), spec.vae["z_dim"]))
    return vae.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- stage 2: cache
CLIP_FRAMES = 13
"""Frames per DiT training clip: 5 + 4 + 4 → latent frames 2 + 1 + 1, three chunks."""
STYLES_PER_CLIP = 7
"""Style targets per clip: every style (so a DiT step can show one clip in several styles, see ``stage_dit``)."""


def stage_clips(run: Run, args: argparse.Namespace) -> None:
    """Pixels of the DiT's training clips and of their style targets (needs no VAE: may run beside stage 1)."""
    st = run.stage("clips")
    if st["done"]:
        return
    budget = Budget(run, "clips", args.cache_clips, 1e9)
    names = train_images()
    styles = style_names()
    shape = (args.cache_clips, CLIP_FRAMES, args.cache_size, args.cache_size, 3)
    inputs = np.lib.format.open_memmap(run.path / "clips_in.npy", "w+", np.uint8, shape)
    targets = np.lib.format.open_memmap(run.path / "clips_tgt.npy", "w+", np.uint8, (shape[0], STYLES_PER_CLIP, *shape[1:]))
    style_ids = np.empty((args.cache_clips, STYLES_PER_CLIP), np.int64)
    for i in range(args.cache_clips):
        rng = _rng(args.seed, 2, i)
        clip = make_clip(str(rng.choice(names)), CLIP_FRAMES, args.cache_size, rng, motion=float(rng.uniform(0, 2)))
        inputs[i] = clip
        # styles in rotation (every style equally often), the rotation's start at random
        first = int(rng.integers(len(styles)))
        for j in range(STYLES_PER_CLIP):
            k = (first + j * (1 + i % 2)) % len(styles) if STYLES_PER_CLIP < len(styles) else j
            style_ids[i, j] = k
            targets[i, j] = np.stack([stylize(styles[k], f) for f in clip])
    inputs.flush()
    targets.flush()
    np.save(run.path / "clips_ids.npy", style_ids)
    budget.tick()
    st["steps"] = args.cache_clips
    st["done"] = True
    run.save()
    print(f"clips done: {args.cache_clips} clips, {st['seconds']:.0f} s", flush=True)


@torch.no_grad()
def stage_cache(run: Run, args: argparse.Namespace) -> None:
    """The clips and targets encoded by the trained (normalised) VAE: ``cache.pt``."""
    stage_clips(run, args)
    st = run.stage("cache")
    if st["done"]:
        return
    budget = Budget(run, "cache", 1, 1e9)
    from sdlive.daemon.model.vae import StreamingVAE

    vae = load_trained_vae(run)
    inputs = np.load(run.path / "clips_in.npy", mmap_mode="r")
    targets = np.load(run.path / "clips_tgt.npy", mmap_mode="r")

    def encode(pixels: np.ndarray) -> torch.Tensor:
        out = []
        for a in range(0, len(pixels), 16):
            out.append(StreamingVAE(vae).encode(_to_tensor(np.ascontiguousarray(pixels[a : a + 16]))).half())
        return torch.cat(out)

    z_in = encode(inputs)
    n, k = targets.shape[:2]
    z_tgt = encode(targets.reshape(n * k, *targets.shape[2:]))
    z_tgt = z_tgt.reshape(n, k, *z_tgt.shape[1:])
    _save({"z_in": z_in, "z_tgt": z_tgt, "style_ids": torch.from_numpy(np.load(run.path / "clips_ids.npy"))}, run.path / "cache.pt")
    budget.tick()
    st["steps"], st["done"] = 1, True
    st["latent_std"] = float(z_in.float().std())
    run.save()
    print(f"cache done: latents {tuple(z_in.shape)}, targets {tuple(z_tgt.shape)}, {st['seconds']:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------- stage 3: DiT
@dataclass
class TrainAttention:
    """What the training self-attention needs, passed through each block as its ``rotary_emb``."""

    freqs_cos: torch.Tensor
    freqs_sin: torch.Tensor
    mask: torch.Tensor
    """[S, S] bool: True where a query token may attend a key token (its own chunk and earlier chunks)."""


class TrainSelfAttention:
    """``attn1`` for training: the same projections, norms and RoPE as the streaming processor
    (``CausalWanAttnProcessor``), with a block-causal mask over the whole clip instead of the KV cache."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, rotary_emb: Any = None) -> torch.Tensor:  # fmt: skip
        from sdlive.daemon.model.causal_wan import apply_rotary_emb

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = apply_rotary_emb(query, rotary_emb.freqs_cos, rotary_emb.freqs_sin)
        key = apply_rotary_emb(key, rotary_emb.freqs_cos, rotary_emb.freqs_sin)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=rotary_emb.mask
        ).transpose(1, 2)
        out = attn.to_out[0](out.flatten(2, 3).type_as(query))
        return attn.to_out[1](out)


def chunk_ids(latent_frames: int) -> list[int]:
    """The engine's chunking of latent frames: 2 in the first chunk, then 1 per chunk."""
    return [0] + [max(0, f - 1) for f in range(1, latent_frames)]


def causal_forward(model: Any, x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The flow ``v`` of a whole clip ``x`` [B, 16, F, h, w] with one timestep label per latent frame ``labels``
    [B, F] and prompt embeddings ``text`` [B, L, text_dim], each chunk attending to itself and the chunks before
    it: what ``forward_stream`` gives chunk by chunk while the KV cache holds the whole clip (with gradients)."""
    b, _, frames, height, width = x.shape
    p_t, p_h, p_w = model.config["patch_size"]
    hh, ww = height // p_h, width // p_w
    per_frame = hh * ww
    tokens = model.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, S, dim]
    emb = model.condition_embedder
    temb = emb.time_embedder(emb.timesteps_proj(labels.reshape(-1)))  # [B·F, dim]
    proj = emb.time_proj(emb.act_fn(temb)).unflatten(1, (6, -1))  # [B·F, 6, dim]
    dim = temb.shape[-1]
    temb = temb.view(b, frames, 1, dim).expand(b, frames, per_frame, dim).reshape(b, -1, dim)
    proj = proj.view(b, frames, 1, 6, dim).expand(b, frames, per_frame, 6, dim).reshape(b, -1, 6, dim)
    context = emb.text_embedder(text)
    cos, sin = model.stream_rotary_emb([0], frames, hh, ww, x.device)
    chunk = torch.tensor(chunk_ids(frames), device=x.device).repeat_interleave(per_frame)
    mask = chunk[None, :] <= chunk[:, None]
    attention = TrainAttention(cos, sin, mask)
    for block in model.blocks:
        tokens = block(tokens, context, proj, attention)
    shift, scale = (model.scale_shift_table[None] + temb[:, :, None]).chunk(2, dim=2)
    tokens = model.norm_out(tokens.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)
    out = model.proj_out(tokens).reshape(b, frames, hh, ww, p_t, p_h, p_w, -1)
    return out.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3).float()


def use_training_attention(model: Any, on: bool) -> None:
    """Swap every ``attn1`` processor to the training one (``on``) or back to the streaming one."""
    from sdlive.daemon.model.causal_wan import CausalWanAttnProcessor

    for block in model.blocks:
        block.attn1.set_processor(TrainSelfAttention() if on else CausalWanAttnProcessor())


def noised_batch(z_in: torch.Tensor, z_tgt: torch.Tensor, rng: np.random.Generator, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The engine's noising of a batch of clips: (x_t, per-frame labels, per-frame σ of the labels).

    ``z_in`` [B, C, F, h, w], ``z_tgt`` [B, K, C, F, h, w]: K style targets per clip. The K samples of a clip share
    their noise and labels (and, for step 1, their x_t): x_t [B, K, C, F, h, w], labels and σ [B, K, F].

    Two kinds of sample, as the engine's denoising steps see them:

    * step 1 (3 in 4): the input latent interpolated with noise, ``s·ε + (1−s)·z``. The first chunk has
      ``s = noise_scale`` and the label 700; later chunks the controller's ``s`` (``noise_scale`` lowered by up to
      0.09 for motion, mixed with the previous ``s``) labelled ``int(1000 s) − 100``.
    * a later step (1 in 4): an estimate of the target re-noised to 500, 400 or 200 with fresh noise
      (``add_noise``), every chunk at that level (a stream-batch slot's cache holds one level).
    """
    from sdlive.daemon.engine.schedule import add_noise, sigma_for

    b, _, frames = z_in.shape[:3]
    k = z_tgt.shape[1]
    chunks = chunk_ids(frames)
    xs, labels = [], []
    noise = torch.randn(z_in.shape, generator=gen)
    for i in range(b):
        if rng.random() < 0.75:
            s0 = float(rng.uniform(0.35, 0.9))
            s_prev, per_chunk = s0, [(s0, 700)]
            for _ in range(max(chunks)):
                s = 0.9 * (s0 - 0.1 * float(rng.uniform(0, 1))) + 0.1 * s_prev
                per_chunk.append((s, int(1000 * s) - 100))
                s_prev = s
            strength = torch.tensor([per_chunk[c][0] for c in chunks]).view(1, -1, 1, 1)
            xs.append((strength * noise[i] + (1 - strength) * z_in[i])[None].expand(k, *z_in.shape[1:]))
            labels.append([[float(per_chunk[c][1]) for c in chunks]] * k)
        else:
            t = float(rng.choice([500, 400, 200]))
            estimate = z_tgt[i] + float(rng.uniform(0, 0.3)) * (z_in[i][None] - z_tgt[i])
            xs.append(add_noise(estimate, noise[i][None], t))
            labels.append([[t] * frames] * k)
    lab = torch.tensor(labels)
    return torch.stack(xs), lab, sigma_for(lab).float()


def style_weighted_loss(x0: torch.Tensor, target: torch.Tensor, k: int, style_weight: float) -> torch.Tensor:
    """MSE of ``x0`` to ``target`` plus ``style_weight`` × the MSE of the error's style-specific part.

    The batch holds groups of ``k`` samples, one clip in ``k`` styles with the same noise: the group's mean error is
    what the styles share (mostly the content the noise destroyed), each sample's deviation from it is the error in
    that sample's style. Plain MSE is dominated by the shared part and a DiT trained on it turns every prompt into one
    average rendering (docs/mini.md); the second term gives the part only the prompt can fix its own weight."""
    err = (x0 - target).unflatten(0, (-1, k))
    return err.pow(2).mean() + style_weight * (err - err.mean(dim=1, keepdim=True)).pow(2).mean()


def build_dit(seed: int) -> Any:
    from sdlive.daemon.model.causal_wan import CausalWanTransformer3DModel

    torch.manual_seed(seed)
    return CausalWanTransformer3DModel(**get_model_spec("mini").transformer)


def stage_dit(run: Run, args: argparse.Namespace) -> None:
    stage_cache(run, args)
    st = run.stage("dit")
    if st["done"]:
        return
    spec = get_model_spec("mini")
    model = build_dit(args.seed)
    use_training_attention(model, True)
    n_styles = len(style_names())
    prompts = torch.nn.Parameter(torch.randn(n_styles, spec.text_len, spec.text_dim, generator=torch.Generator()
                                             .manual_seed(args.seed)))  # fmt: skip
    params = [*model.parameters(), prompts]
    opt = torch.optim.AdamW([{"params": list(model.parameters())}, {"params": [prompts], "weight_decay": 0.0}],
                            lr=args.dit_lr, weight_decay=0.01)  # fmt: skip
    ckpt = run.path / "dit.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        prompts.data.copy_(saved["prompts"])
        opt.load_state_dict(saved["opt"])
        print(f"dit: resuming at step {st['steps']}", flush=True)
    cache = torch.load(run.path / "cache.pt", weights_only=False)
    z_in_all, z_tgt_all, style_ids = cache["z_in"], cache["z_tgt"], cache["style_ids"]
    n_clips, per_clip = style_ids.shape
    budget = Budget(run, "dit", args.dit_steps, args.dit_minutes)
    last_ckpt = time.monotonic()
    model.train()
    losses: list[float] = []
    while not budget.over():
        step = st["steps"]
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.dit_steps, args.dit_lr)
        rng = _rng(args.seed, 3, step)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        # 4 in 5 steps: --dit-batch samples of random 16×16-latent crops (128 px views), --dit-styles styles of each
        # of --dit-batch / --dit-styles clips; else one clip in half as many styles at the full 32×32 latent (256 px),
        # the size sdlive runs at: about the same tokens per step either way.
        full = rng.random() < 0.2
        k = max(2, args.dit_styles // 2) if full else args.dit_styles
        batch = 1 if full else max(1, args.dit_batch // k)
        clips = torch.from_numpy(rng.integers(0, n_clips, batch))
        which = torch.from_numpy(np.stack([rng.permutation(per_clip)[:k] for _ in range(batch)]))  # [batch, k]
        z_in = z_in_all[clips].float()
        z_tgt = z_tgt_all[clips[:, None], which].float()  # [batch, k, C, F, h, w]
        styles = style_ids[clips[:, None], which].reshape(-1)
        if not full:
            side = z_in.shape[-1]
            y, x = (int(v) for v in rng.integers(0, side - 16 + 1, 2))
            z_in, z_tgt = z_in[..., y : y + 16, x : x + 16], z_tgt[..., y : y + 16, x : x + 16]
        if rng.random() < 0.5:  # mirrored clips: more content from the same cache
            z_in, z_tgt = z_in.flip(-1), z_tgt.flip(-1)
        x_t, labels, sigma = noised_batch(z_in, z_tgt, rng, gen)
        x_t, labels, sigma, z_tgt = x_t.flatten(0, 1), labels.flatten(0, 1), sigma.flatten(0, 1), z_tgt.flatten(0, 1)
        flow = causal_forward(model, x_t, labels, prompts[styles])
        x0 = x_t - sigma.view(*sigma.shape[:1], 1, -1, 1, 1) * flow
        loss = style_weighted_loss(x0, z_tgt, k, args.dit_style_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        st["steps"] = step + 1
        if st["steps"] % 20 == 0:
            print(f"dit step {st['steps']} loss {np.mean(losses[-20:]):.4f} {budget.st['seconds']:.0f} s", flush=True)
        if time.monotonic() - last_ckpt > args.checkpoint_s:
            budget.tick()
            _save({"model": model.state_dict(), "prompts": prompts.data, "opt": opt.state_dict()}, ckpt)
            run.save()
            last_ckpt = time.monotonic()
    budget.tick()
    _save({"model": model.state_dict(), "prompts": prompts.data, "opt": opt.state_dict()}, ckpt)
    st["done"] = True
    st["final_loss"] = float(np.mean(losses[-50:])) if losses else None
    budget.tick()
    run.save()
    print(f"dit done: {st['steps']} steps, {st['seconds']:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------- stage 4: export
def stage_export(run: Run, args: argparse.Namespace) -> None:
    """The shipped weights: ``transformer.safetensors``, ``vae.safetensors``, ``prompts.safetensors`` (the style
    embeddings, the prompts in the metadata) and ``train_log.json`` in ``--export``."""
    from safetensors.torch import save_file

    stage_dit(run, args)
    out = args.export
    out.mkdir(parents=True, exist_ok=True)
    spec = get_model_spec("mini")
    vae_state = normalised_vae_state(torch.load(run.path / "vae.pt", weights_only=False), spec.vae["z_dim"])
    dit = torch.load(run.path / "dit.pt", weights_only=False)
    meta = {"model": "mini", "seed": str(args.seed)}
    save_file({k: v.contiguous() for k, v in dit["model"].items()}, out / "transformer.safetensors", metadata=meta)
    save_file({k: v.contiguous() for k, v in vae_state.items()}, out / "vae.safetensors", metadata=meta)
    save_file({"embeds": dit["prompts"].contiguous()}, out / "prompts.safetensors",
              metadata={**meta, "prompts": json.dumps(style_names())})  # fmt: skip
    log = {
        "seed": args.seed,
        "command": "python tools/train_mini.py " + " ".join(sys.argv[1:]),
        "total_minutes": run.total_seconds() / 60,
        "stages": run.state["stages"],
        "styles": style_names(),
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"exported to {out}", flush=True)


# ----------------------------------------------------------------------------------------------- command line
STAGES = ("vae", "clips", "cache", "dit", "export")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "mini", help="run folder (state, checkpoints)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="run up to and including this stage")
    parser.add_argument("--only", choices=STAGES, default=None,
                        help="start at this stage (``clips`` needs no VAE, so it may run beside ``vae``)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--max-total-min", type=float, default=60.0, help="cap on all stages' training time")
    parser.add_argument("--checkpoint-s", type=float, default=120.0)
    parser.add_argument("--vae-steps", type=int, default=1400)
    parser.add_argument("--vae-minutes", type=float, default=24.0)
    parser.add_argument("--vae-batch", type=int, default=4)
    parser.add_argument("--vae-size", type=int, default=128)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-small-frac", type=float, default=0.85,
                        help="fraction of the VAE steps on 64×64 crops (the rest at --vae-size)")
    parser.add_argument("--cache-clips", type=int, default=150)
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--dit-steps", type=int, default=800)
    parser.add_argument("--dit-minutes", type=float, default=30.0)
    parser.add_argument("--dit-batch", type=int, default=8)
    parser.add_argument("--dit-lr", type=float, default=1e-3)
    parser.add_argument("--dit-styles", type=int, default=4, help="styles per clip in a DiT step (same noise)")
    parser.add_argument("--dit-style-weight", type=float, default=2.0,
                        help="weight of the style-specific part of the DiT's error (style_weighted_loss)")
    parser.add_argument("--export", type=Path, default=DEFAULT_EXPORT, help="where the shipped weights go")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Run(args.run, args.seed, args.max_total_min * 60)
    run.state["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    last = len(STAGES) if args.stage == "all" else STAGES.index(args.stage) + 1
    for name in STAGES[STAGES.index(args.only) if args.only else 0 : last]:
        globals()[f"stage_{name}"](run, args)
    per_stage = ", ".join(f"{k} {v['seconds'] / 60:.1f}" for k, v in run.state["stages"].items())
    print(f"training time so far: {run.total_seconds() / 60:.1f} min ({per_stage})")


if __name__ == "__main__":
    main()
