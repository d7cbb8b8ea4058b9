"""One live stream through the StreamDiffusionV2 loop: frames in, restyled frames out.

A session owns all per-stream state (VAE feature caches, DiT KV caches, the noise controller, the prompt blend, the
random generator); the model weights belong to the ``StreamEngine`` and are shared by every session.

The loop (DESIGN §3): frames are grouped into chunks (5 frames first, then 4), VAE-encoded, noised by the
motion-aware controller and denoised by the causal DiT. In stream-batch mode with n steps, slot i of one batched
forward holds the chunk that is at step i, each slot with its own KV cache; a chunk leaves the pipeline after n
calls. In no-batch mode each chunk runs its n steps back to back on one cache.

A frame's path, by type: ``push(Pixels)`` → ``_frame_to_tensor``: RGB float ``[3, H, W]`` → a chunk ``[1, 3, T, H, W]``
→ ``StreamingVAE.encode``: latents ``[1, 16, F, h, w]`` → noised → ``CausalWanTransformer3DModel.forward_stream``
(with the session's ``CrossAttentionCache`` and ``KVCache``): flow → x0 (``_Denoised``) → ``StreamingVAE.decode``:
``[1, 3, T, H, W]`` → ``_tensor_to_frames``: ``Pixels`` → ``list[OutputFrame]``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
import torch

from ..protocol.constants import PIXEL_FORMATS, SIZE_MULTIPLE
from ..protocol.params import GenerationParams
from .frames import FrameUpload, to_pixel_format
from .interface import OutputFrame, Pixels, StageTimes
from .schedule import NoiseController, add_noise, flow_to_x0, timesteps_for
from .timing import StageClock

if TYPE_CHECKING:  # the model (diffusers) is the engine's; this module never imports it
    from ..model.causal_wan import CrossAttentionCache
    from ..model.kv_cache import KVCache
    from .engine import StreamEngine

FIRST_CHUNK_FRAMES = 5
CHUNK_FRAMES = 4

NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]
"""Noise of a shape, instead of the session's seeded generator (tests: ``torch.zeros``)."""

_T = TypeVar("_T")


@dataclass
class ForwardCall:
    """One DiT forward a session's chunk needs: ``forward_stream(x, t, cross, cache, commit)`` with the LoRA weights
    ``lora`` active. A session's steps yield these and are sent back the flow ``[B, 16, F, h, w]`` (float32), so
    that a caller may run several sessions' calls as one forward (``engine.batch``)."""

    x: torch.Tensor  # [B, 16, F, h, w]
    t: torch.Tensor  # [B]
    cross: CrossAttentionCache  # batch 1 or B
    cache: KVCache  # B slots
    commit: bool | list[bool]
    lora: dict[str, float] = field(default_factory=dict)


Steps = Generator[ForwardCall, torch.Tensor, _T]
"""A session's work that needs DiT forwards: it yields each :class:`ForwardCall`, is sent its flow, and returns
its result (``StreamSession.push_steps``)."""


@dataclass
class _InFlight:
    """A chunk inside the stream-batch pipeline, waiting for its next denoising step."""

    latent: torch.Tensor  # x_t at `step`, [1, 16, F, h, w]
    step: int
    first_index: int | None  # None: a warm-up filler (compat="upstream"), never decoded


class _Denoised(NamedTuple):
    """A chunk that left the DiT: its clean latents and the index of its first input frame."""

    x0: torch.Tensor  # [1, 16, F, h, w]
    first_index: int


@dataclass
class _LoraBlend:
    """A LoRA change: adapter weights move from ``start`` to ``target`` over ``total`` chunks."""

    start: dict[str, float]
    target: dict[str, float]
    total: int
    done: int = 0


@dataclass
class _Blend:
    """A prompt transition: the text embedding moves from ``start`` to ``target`` over ``total`` chunks."""

    start: torch.Tensor  # [1, text_len, text_dim]
    target: torch.Tensor
    total: int
    done: int = 0


class StreamSession:
    """Frames in, restyled frames out, with live parameter changes. Implements :class:`~.interface.EngineSession`.

    ``push`` takes one frame (``H×W×C`` uint8 in ``pixel_format``, or a float tensor ``[3, H, W]`` RGB in [-1, 1])
    and returns the frames that became ready (possibly none). Bad input raises ``ValueError`` and leaves the
    session as it was.
    """

    def __init__(
        self,
        engine: StreamEngine,
        *,
        width: int,
        height: int,
        params: GenerationParams,
        pixel_format: str = "rgb24",
        noise_fn: NoiseFn | None = None,
    ) -> None:
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
                raise ValueError(
                    f"{name} must be a positive multiple of {SIZE_MULTIPLE} (got {value!r}): "
                    f"resize or crop the source, e.g. 512×512 or 480×832"
                )
        if pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"unknown pixel format {pixel_format!r}: expected one of {', '.join(PIXEL_FORMATS)}")
        if not isinstance(params, GenerationParams):
            raise ValueError(f"params must be a GenerationParams (got {type(params).__name__})")
        self.engine = engine
        self.width = width
        self.height = height
        self.pixel_format = pixel_format
        self._channels, self._rgb_index = (
            PIXEL_FORMATS[pixel_format].bytes_per_pixel,
            PIXEL_FORMATS[pixel_format].rgb_index,
        )
        self._params = params
        self._external_noise = noise_fn
        self._device = engine.device
        self._dtype = engine.dtype
        self._upload = FrameUpload(height, width, self._channels, self._rgb_index, self._device)
        self._tokens_per_frame = (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)
        self._vae = engine.new_vae()
        self._clock = StageClock(self._device)
        """The last chunk's stage timings."""
        self._lora_weights: dict[str, float] = {}  # adapter name → weight, this chunk
        self._lora_target: dict[str, float] = {}
        self._lora_blend: _LoraBlend | None = None
        self._cross_lora: dict[str, float] | None = None  # the weights the cross-attention cache was made with
        self.reset()

    # ------------------------------------------------------------------ public API

    @property
    def params(self) -> GenerationParams:
        return self._params

    @property
    def latency_frames(self) -> int:
        """Most input frames that arrive after an input frame before its output is ready."""
        depth = self._params.steps if self._params.stream_batch else 1
        # A chunk's first frame waits for the rest of its chunk, then for depth − 1 more chunks.
        return max(FIRST_CHUNK_FRAMES - 1, CHUNK_FRAMES - 1 + CHUNK_FRAMES * (depth - 1))

    @property
    def lora_weights(self) -> dict[str, float]:
        """The LoRA adapters' weights this session's next chunk runs with (``{}``: none)."""
        return dict(self._lora_weights)

    @property
    def frames_in(self) -> int:
        return self._frames_in

    @property
    def frames_out(self) -> int:
        return self._frames_out

    @property
    def chunks(self) -> int:
        return self._chunks

    @property
    def stage_ms(self) -> StageTimes:
        """Milliseconds the last measured chunk spent encoding, in the DiT and decoding (on CUDA read from timing
        events once they are done, never waited for: ``timing.StageClock``)."""
        return self._clock.times()

    @torch.inference_mode()
    def reset(self) -> None:
        """Start over: empty caches, counters and noise state (the prompt stays)."""
        self._vae.reset()
        self._controller = NoiseController(self._params.noise_scale)
        self._generator = torch.Generator(device="cpu").manual_seed(self._params.seed)
        self._pending: list[torch.Tensor] = []
        self._ready: list[OutputFrame] = []
        self._next_chunk_index = 0
        self._previous_frame: torch.Tensor | None = None
        self._inflight: list[_InFlight] = []
        self._batch_cache: KVCache | None = None  # stream batch: one slot per step level
        self._seq_cache: KVCache | None = None  # no-batch mode (and the first chunk): batch 1
        self._cache_steps = 0
        self._frames_in = 0
        self._frames_out = 0
        self._chunks = 0
        self._embeds = self.engine.encode_prompt(self._params.prompt)
        self._blend: _Blend | None = None
        self._cross: CrossAttentionCache
        self._set_embeds(self._embeds)

    @torch.inference_mode()
    def set_params(self, **changes: Any) -> None:
        """Change parameters between chunks. A prompt change blends over ``transition_chunks`` chunks; caches and
        counters continue. Unknown names or invalid values raise ``ValueError`` and change nothing (``changes`` are
        ``GenerationParams`` fields, validated there)."""
        new = GenerationParams.model_validate({**self._params.model_dump(), **changes})
        old = self._params
        # Everything that can fail comes first, so a failure changes nothing.
        target = self.engine.encode_prompt(new.prompt) if new.prompt != old.prompt else None
        mode_change = new.stream_batch != old.stream_batch or new.steps != old.steps
        if mode_change and self._chunks:
            # Finish what is in the pipeline at the old step count, then rebuild the caches for the new one.
            self._ready.extend(self._run_alone(self._drain()))
        if target is not None:
            if new.transition_chunks == 0 or self._chunks == 0:
                self._set_embeds(target)
                self._blend = None
            else:
                self._blend = _Blend(start=self._embeds, target=target, total=new.transition_chunks)
        if new.seed != old.seed:
            self._generator = torch.Generator(device="cpu").manual_seed(new.seed)
        if new.noise_scale != old.noise_scale:
            self._controller.noise_scale = new.noise_scale
        self._params = new
        if mode_change and self._chunks:
            self._rebuild_caches()

    @torch.inference_mode()
    def set_lora(self, path: str | None, strength: float = 1.0, *, transition_chunks: int | None = None) -> None:
        """Style the stream with the LoRA file ``path`` at ``strength`` (``None``: no LoRA), blending over
        ``transition_chunks`` chunks (default: the session's) as a prompt change does; caches and counters continue.
        A missing or mismatched file raises :class:`~sdlive.daemon.model.lora.LoraError` (a ``ValueError``) and
        changes nothing."""
        if not -2.0 <= float(strength) <= 2.0:
            raise ValueError(f"lora_strength must be in -2..2, got {strength}")
        target = {} if path is None else {self.engine.lora.load(path): float(strength)}
        if target == self._lora_target:
            return
        self._lora_target = target
        chunks = self._params.transition_chunks if transition_chunks is None else int(transition_chunks)
        if self._chunks == 0 or chunks <= 0:
            self._lora_weights, self._lora_blend = dict(target), None
        else:
            self._lora_blend = _LoraBlend(dict(self._lora_weights), target, chunks)

    @torch.inference_mode()
    def push(self, frame: Pixels | torch.Tensor) -> list[OutputFrame]:
        """Add one frame; returns the restyled frames that became ready, in input order."""
        return self._run_alone(self.push_steps(frame))

    def check_frame(self, frame: Pixels | torch.Tensor) -> None:
        """Raise ``ValueError`` for a frame ``push`` would refuse (a pipeline checks before its ranks push); it
        converts nothing, so checking first costs no second copy of the frame."""
        if isinstance(frame, torch.Tensor):
            if frame.shape != (3, self.height, self.width):
                raise ValueError(f"tensor frame must be [3, {self.height}, {self.width}] RGB (got {list(frame.shape)})")
            if not frame.is_floating_point():
                raise ValueError(f"tensor frame must be floating point in [-1, 1] (got {frame.dtype})")
            if not torch.isfinite(frame).all():
                raise ValueError("frame contains NaN or infinite values")
            return
        if not isinstance(frame, np.ndarray):
            raise ValueError(f"frame must be a numpy array or a torch tensor (got {type(frame).__name__})")
        expected = (self.height, self.width, self._channels)
        if frame.shape != expected:
            raise ValueError(
                f"frame shape {frame.shape} != {expected} ({self.pixel_format} at {self.width}×{self.height})"
            )
        if frame.dtype != np.uint8:
            raise ValueError(f"unexpected frame dtype: {frame.dtype} != uint8")

    def kv_caches(self) -> list[KVCache]:
        """The KV caches this session holds now (a pipeline's rebalance moves their blocks between ranks)."""
        return [c for c in (self._seq_cache, self._batch_cache) if c is not None]

    def refresh_cross_attention(self) -> None:
        """Remake the text K/V for the engine's blocks (after a rebalance changed which blocks it runs)."""
        with torch.inference_mode():
            self._set_embeds(self._embeds)

    @property
    def runs_chunk_next(self) -> bool:
        """The next ``push`` completes a chunk (runs the DiT); the others only buffer a frame."""
        return len(self._pending) + 1 >= (FIRST_CHUNK_FRAMES if self._chunks == 0 else CHUNK_FRAMES)

    @property
    def frames_to_chunk(self) -> int | None:
        """Pushes before the one that runs the next chunk (0: the next push runs it); ``None`` before the first
        chunk (5 frames, 2 latent frames: it never shares a forward with a later chunk)."""
        return None if self._chunks == 0 else max(0, CHUNK_FRAMES - len(self._pending) - 1)

    def batch_key(self) -> tuple[Any, ...]:
        """Sessions with equal keys can share one forward when their chunks run together (``engine.batch``): the
        same engine (``--mode shard`` has one per device, and two on one CPU are still two models), latent size,
        dtype and device; the chunk shape and the LoRA weights are checked per forward."""
        return (id(self.engine), self.width, self.height, str(self._device), str(self._dtype))

    def push_steps(self, frame: Pixels | torch.Tensor) -> Steps[list[OutputFrame]]:
        """:meth:`push` as steps (:data:`Steps`): the caller runs the forwards it yields, alone or batched with other
        sessions' (``engine.batch.run_together``). A bad frame raises ``ValueError`` at the first step, changing
        nothing."""
        with torch.inference_mode():
            pixels = self._frame_to_tensor(frame)
        self._pending.append(pixels)
        self._frames_in += 1
        needed = FIRST_CHUNK_FRAMES if self._chunks == 0 else CHUNK_FRAMES
        if len(self._pending) >= needed:
            yield from self._run_chunk(needed)
        return self._take_ready()

    def _run_alone(self, steps: Steps[_T]) -> _T:
        """Run ``steps``' forwards one by one on this session's engine."""
        try:
            call = next(steps)
            while True:
                call = steps.send(self.engine.run_forward(call))
        except StopIteration as stop:
            result: _T = stop.value
            return result

    def _forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross: CrossAttentionCache,
        cache: KVCache,
        commit: bool | list[bool] = True,
    ) -> Steps[torch.Tensor]:
        """One DiT forward, run by whoever drives the steps; returns the flow."""
        flow = yield ForwardCall(x, t, cross, cache, commit, dict(self._lora_weights))
        return flow

    @torch.inference_mode()
    def flush(self) -> list[OutputFrame]:
        """End of stream: finish every chunk in flight and a partial last chunk (padded by repeating its last
        frame; only real frames are returned), so every pushed frame gets its output."""
        if self._pending:
            needed = FIRST_CHUNK_FRAMES if self._chunks == 0 else CHUNK_FRAMES
            self._pending.extend([self._pending[-1]] * (needed - len(self._pending)))
            self._run_alone(self._run_chunk(needed))
        self._ready.extend(self._run_alone(self._drain()))
        padding = [f for f in self._ready if f.index >= self._frames_in]
        self._frames_out -= len(padding)
        self._ready = [f for f in self._ready if f.index < self._frames_in]
        return self._take_ready()

    # ------------------------------------------------------------------ frames

    def _frame_to_tensor(self, frame: Pixels | torch.Tensor) -> torch.Tensor:
        """Validate one frame (:meth:`check_frame`) and turn it into RGB float [3, H, W] in [-1, 1] on the engine's
        device."""
        self.check_frame(frame)
        if isinstance(frame, torch.Tensor):
            return frame.to(self._device, torch.float32).clamp(-1, 1)
        assert isinstance(frame, np.ndarray)
        return self._upload(frame)

    def _tensor_to_frames(self, video: torch.Tensor) -> list[Pixels]:
        """[1, 3, T, H, W] in [-1, 1] → T frames H×W×C uint8 in the session's pixel format (made on the device,
        read back once)."""
        return list(self._read_back(to_pixel_format(video, self._channels, self._rgb_index)))

    def _read_back(self, pixels: torch.Tensor) -> np.ndarray:
        """``pixels`` (uint8) on the host, and with them, in the same device→host copy, the KV caches' sink
        decisions still on the device (``KVCache.pending_sink_choices``): a steady chunk reads the device once."""
        pending = [(c, ch) for c in self.kv_caches() if (ch := c.pending_sink_choices()) is not None]
        if not pending:
            return pixels.cpu().numpy()
        host = torch.cat([pixels.reshape(-1), *[(ch + 1).to(torch.uint8) for _, ch in pending]]).cpu().numpy()
        n = pixels.numel()
        at = n
        for cache, ch in pending:
            cache.resolve_sink_choices((host[at : at + ch.numel()].astype(np.int64) - 1).tolist())
            at += ch.numel()
        return host[:n].reshape(tuple(pixels.shape))

    # ------------------------------------------------------------------ the loop

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._external_noise is not None:
            noise = self._external_noise(shape)
        else:
            # Drawn on the CPU so a seed gives the same stream on every device.
            noise = torch.randn(shape, generator=self._generator, dtype=torch.float32)
        return noise.to(self._device, self._dtype)

    def _chunk_cross(self) -> CrossAttentionCache:
        """The cross-attention cache for this chunk, one blend step further if a prompt transition is running."""
        blend = self._blend
        if blend is not None:
            blend.done += 1
            alpha = min(blend.done / blend.total, 1.0)
            self._set_embeds(torch.lerp(blend.start, blend.target, alpha))
            if alpha >= 1.0:
                self._blend = None
        return self._cross

    def _set_embeds(self, embeds: torch.Tensor) -> None:
        self._embeds = embeds
        self.engine.lora.activate(self._lora_weights)  # a LoRA on attn2's projections shapes the text K/V too
        self._cross = self.engine.cross_attention_cache(embeds)
        self._cross_lora = dict(self._lora_weights)

    def _step_lora(self) -> None:
        """One chunk further in a LoRA transition."""
        blend = self._lora_blend
        if blend is None:
            return
        blend.done += 1
        alpha = min(blend.done / blend.total, 1.0)
        names = sorted(set(blend.start) | set(blend.target))
        weights = {n: (1 - alpha) * blend.start.get(n, 0.0) + alpha * blend.target.get(n, 0.0) for n in names}
        self._lora_weights = {n: w for n, w in weights.items() if w != 0.0}
        if alpha >= 1.0:
            self._lora_blend = None

    def _lora_cross(self) -> CrossAttentionCache:
        """This session's LoRA weights in effect (the engine's adapters are shared by the sessions, which run one
        forward at a time), and its cross-attention cache made with them."""
        self.engine.lora.activate(self._lora_weights)
        if self._cross_lora != self._lora_weights:
            self._set_embeds(self._embeds)
        return self._cross

    def _run_chunk(self, needed: int) -> Steps[None]:
        frames = self._pending[:needed]
        del self._pending[:needed]
        first_index = self._next_chunk_index
        self._next_chunk_index += needed
        video = torch.stack(frames, dim=1).unsqueeze(0).to(self._dtype)  # [1, 3, T, H, W]
        clock = self._clock

        # 1. VAE encode (the causal-conv caches carry over from the previous chunk)
        clock.start()
        with torch.inference_mode():
            latents = self._vae.encode(video)
        clock.mark()

        # 2. Motion-aware noise: s interpolates the input, current_step labels it
        steps = timesteps_for(self._params.steps)
        previous = self._previous_frame
        strength: float | torch.Tensor  # a device tensor after the first chunk: never read back
        first_step: int | torch.Tensor
        if self._chunks == 0 or previous is None:
            strength, first_step = self._controller.first(), steps[0]
        else:
            motion_frames = torch.cat([previous.unsqueeze(1).unsqueeze(0), video.float()], dim=2)
            strength, first_step = self._controller.update(motion_frames)
        self._previous_frame = frames[-1]
        noisy = strength * self._noise(tuple(latents.shape)) + (1 - strength) * latents
        self._step_lora()
        self._chunk_cross()
        cross = self._lora_cross()

        # 3. DiT: the first chunk (and no-batch mode) runs all steps here; stream batch runs one step per slot
        finished: list[_Denoised] = []
        if self._chunks == 0 or not self._params.stream_batch:
            x0 = yield from self._denoise_sequential(noisy, first_step, steps, cross)
            finished.append(_Denoised(x0, first_index))
        else:
            finished.extend((yield from self._stream_batch_step(noisy, first_step, steps, cross, first_index)))
        clock.mark()

        # 4. VAE decode of what left the pipeline
        with torch.inference_mode():
            for x0, start in finished:
                self._ready.extend(self._decode(x0, start))
        clock.mark()
        self._chunks += 1

    def _labels(self, first: int | torch.Tensor, rest: Sequence[int] = ()) -> torch.Tensor:
        """The timestep labels of one forward, float64 on the device: ``first`` (the noise controller's, a device
        tensor after the first chunk: never read back) then ``rest``."""
        if isinstance(first, torch.Tensor):
            head = first.reshape(1).to(torch.float64)
            return torch.cat([head, torch.tensor(rest, dtype=torch.float64, device=self._device)]) if rest else head
        return torch.tensor([first, *rest], dtype=torch.float64, device=self._device)

    def _denoise_sequential(
        self, noisy: torch.Tensor, first_step: int | torch.Tensor, steps: tuple[int, ...], cross: CrossAttentionCache
    ) -> Steps[torch.Tensor]:
        """All steps of one chunk back to back on the batch-1 cache (no-batch mode and the first chunk)."""
        if self._seq_cache is None:
            self._seq_cache = self._new_cache(batch_size=1)
            self._seq_cache.steps_per_chunk = len(steps)
        seq_cache = self._seq_cache
        x = noisy
        x0 = noisy
        for i, step in enumerate(steps):
            label = self._labels(first_step if i == 0 else step)
            # Only the last step's keys stay in the cache: the earlier writes go to the same slot.
            flow = yield from self._forward(x, label.float(), cross, seq_cache, commit=i == len(steps) - 1)
            x0 = flow_to_x0(x, flow.to(x.dtype), label)
            if i < len(steps) - 1:
                x = add_noise(x0, self._noise(tuple(x0.shape)), [steps[i + 1]])
        if self._params.stream_batch and len(steps) > 1:
            # The first chunk fills the caches; from now on every step level has its own copy.
            self._batch_cache = seq_cache.repeat(len(steps))
            self._seq_cache = None
        self._cache_steps = len(steps)
        return x0

    def _stream_batch_step(
        self,
        noisy: torch.Tensor,
        first_step: int | torch.Tensor,
        steps: tuple[int, ...],
        cross: CrossAttentionCache,
        first_index: int,
    ) -> Steps[list[_Denoised]]:
        """One batched forward: slot 0 takes the new chunk, slot i the chunk that is at step i.

        While the pipeline fills (fewer chunks than slots), ``compat="upstream"`` runs every slot as upstream does,
        the empty ones on a filler (zeros at first, as upstream's zeroed hidden states, then what the filler became),
        uncommitted so that the real chunk rewrites the same cache frames next call; their sink checks count, as
        upstream's do. ``"clean"`` runs only the occupied slots, so the empty slots' caches stay untouched.
        """
        n = len(steps)
        if n == 1:
            return [_Denoised((yield from self._denoise_sequential(noisy, first_step, steps, cross)), first_index)]
        slots = [_InFlight(noisy, 0, first_index), *self._inflight]
        if self.engine.compat == "upstream":
            slots += [_InFlight(torch.zeros_like(noisy), i, None) for i in range(len(slots), n)]
        k = len(slots)
        x = torch.cat([s.latent for s in slots], dim=0)
        labels = self._labels(first_step, [steps[s.step] for s in slots[1:]])
        real = [s.first_index is not None for s in slots]
        with self._level_caches().subset(0, k) as cache:
            flow = yield from self._forward(x, labels.float(), cross, cache, commit=True if all(real) else real)
        x0 = flow_to_x0(x, flow.to(x.dtype), labels)
        finished: list[_Denoised] = []
        inflight: list[_InFlight] = []
        for i, slot in enumerate(slots):
            if i == n - 1:
                if slot.first_index is not None:
                    finished.append(_Denoised(x0[i : i + 1], slot.first_index))
            else:
                renoised = add_noise(x0[i : i + 1], self._noise(tuple(x0[i : i + 1].shape)), [steps[i + 1]])
                inflight.append(_InFlight(renoised, i + 1, slot.first_index))
        self._inflight = inflight
        return finished

    def _drain(self) -> Steps[list[OutputFrame]]:
        """Finish the chunks in the stream-batch pipeline, oldest first, each remaining step on its own level's cache
        (the same writes the pipeline would have made), and return their frames."""
        out: list[OutputFrame] = []
        steps = timesteps_for(self._cache_steps) if self._cache_steps else ()
        if self._inflight:
            self._lora_cross()
        for chunk in reversed(self._inflight):
            if chunk.first_index is None:
                continue  # a filler: the real chunks behind it rewrite its cache frames on their way through
            x, j = chunk.latent, chunk.step
            while True:
                t = torch.tensor([steps[j]], device=self._device, dtype=torch.float32)
                with self._level_caches().subset(j, j + 1) as cache:
                    flow = yield from self._forward(x, t, self._cross, cache, commit=True)
                x0 = flow_to_x0(x, flow.to(x.dtype), [steps[j]])
                if j == len(steps) - 1:
                    break
                x = add_noise(x0, self._noise(tuple(x0.shape)), [steps[j + 1]])
                j += 1
            out.extend(self._decode(x0, chunk.first_index))
        self._inflight = []
        self.engine.synchronize()
        return out

    def _rebuild_caches(self) -> None:
        """Shape the caches for the current mode and step count, keeping what they hold."""
        if self._chunks == 0:
            return
        base = self._seq_cache
        if self._batch_cache is not None:
            # upstream's SLO fallback keeps slot 0's cache (its auto mode slices [:1]); clean the most denoised level
            level = 0 if self.engine.compat == "upstream" else self._batch_cache.batch_size - 1
            base = self._batch_cache.select(level)
        if base is None:
            raise RuntimeError("a session that ran a chunk has a KV cache")
        n = self._params.steps
        if self._params.stream_batch and n > 1:
            self._batch_cache, self._seq_cache = base.repeat(n), None
        else:
            self._batch_cache, self._seq_cache = None, base
            base.steps_per_chunk = n
        self._cache_steps = n

    def _decode(self, x0: torch.Tensor, first_index: int) -> list[OutputFrame]:
        frames = self._tensor_to_frames(self._vae.decode(x0))
        out = [OutputFrame(first_index + i, f) for i, f in enumerate(frames)]
        self._frames_out += len(out)
        return out

    def _take_ready(self) -> list[OutputFrame]:
        ready, self._ready = self._ready, []
        return ready

    def _new_cache(self, batch_size: int) -> KVCache:
        return self.engine.new_kv_cache(batch_size=batch_size, tokens_per_frame=self._tokens_per_frame)

    def _level_caches(self) -> KVCache:
        """The stream batch's cache, one slot per step level (made from the first chunk's cache)."""
        if self._batch_cache is None:
            raise RuntimeError("the stream batch runs only after the first chunk made its cache")
        return self._batch_cache
