"""Session batching: several sessions' chunks through one DiT forward, each with its own KV-cache slots.

A session's chunk is a sequence of forwards (``StreamSession.push_steps`` yields each as a ``ForwardCall``);
:func:`run_together` drives several sessions' steps in lockstep. Each round it collects the forward every session
waits for, groups the compatible ones and runs each group as one forward, then sends every session its share of
the flow. Sessions whose steps need more forwards (no-batch mode, more steps, the first chunk) simply take part
in more rounds; a session whose push only buffers a frame needs none.

**Why this is exact.** Sessions opened at different times sit at different RoPE positions and cache fills; none of
that is shared. The forward's inputs are concatenated per sample: latents, timesteps, the text K/V (each session's
own cross-attention cache, expanded to its slots) and the KV cache as a :class:`JoinedKVCache`, which hands every
session's slice of the keys/values to that session's own ``KVCache`` (its own bookkeeping: fill, ring, sinks,
upstream's counters), and returns the concatenated window with per-slot valid lengths. RoPE is already per slot
(``stream_rotary_emb``), and attention runs once per run of slots with equal lengths, unmasked (``causal_wan``'s
processor), so no sample ever attends to another's keys. The only per-sample coupling left is numerical: the
linear layers see a larger batch (float tolerance). What must match exactly is checked per forward: the latent
shape ``[16, F, h, w]`` (the first chunk, with 2 latent frames, groups only with other first chunks), the dtype,
the device and the LoRA weights (the adapters are shared by the engine; sessions with different weights run apart).

The cost: the window is a copy of each member's valid cache frames per block and forward (a forward reads them
once anyway); the text K/V of the group are concatenated once per forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from ..model.causal_wan import CrossAttentionCache
from ..model.kv_cache import CacheWindow, KVCache
from .session import ForwardCall, Steps

if TYPE_CHECKING:
    from .engine import StreamEngine

__all__ = ["GroupTiming", "JoinedKVCache", "join_calls", "run_together"]


class JoinedKVCache:
    """Several sessions' KV caches as one batch for one forward: slots ``[0, b_0)`` are the first cache's, the next
    ``b_1`` the second's, and so on. ``forward_stream`` uses only ``batch_size``, ``tokens_per_frame``,
    ``frame_positions``, ``write`` and ``commit``; each goes to the member caches."""

    def __init__(self, members: Sequence[KVCache]) -> None:
        if not members:
            raise ValueError("a joined KV cache needs at least one member")
        tokens = {m.tokens_per_frame for m in members}
        layers = {m.num_layers for m in members}
        if len(tokens) != 1 or len(layers) != 1:
            raise ValueError(f"caches of different shapes cannot be joined: tokens per frame {tokens}, blocks {layers}")
        self.members = list(members)
        self.sizes = [m.batch_size for m in members]
        self.batch_size = sum(self.sizes)
        self.tokens_per_frame = members[0].tokens_per_frame
        self.num_layers = members[0].num_layers

    def frame_positions(self) -> list[int]:
        return [p for m in self.members for p in m.frame_positions()]

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> CacheWindow:
        """Every member writes its slots' keys/values; the joined window holds each slot's valid frames first."""
        windows = [
            m.write(layer, k, v)
            for m, k, v in zip(self.members, key.split(self.sizes), value.split(self.sizes), strict=True)
        ]
        lengths = [n for w in windows for n in (w.lengths or [w.key.shape[1]] * w.key.shape[0])]
        longest = max(lengths)
        if all(w.key.shape[1] == longest for w in windows):
            joined_k = torch.cat([w.key for w in windows])
            joined_v = torch.cat([w.value for w in windows])
        else:
            first = windows[0].key
            joined_k = first.new_zeros((self.batch_size, longest, *first.shape[2:]))
            joined_v = torch.zeros_like(joined_k)
            row = 0
            for w in windows:
                b, s = w.key.shape[:2]
                joined_k[row : row + b, :s] = w.key
                joined_v[row : row + b, :s] = w.value
                row += b
        uniform = min(lengths) == longest
        return CacheWindow(joined_k, joined_v, None if uniform else lengths)

    def commit(self, slots: bool | Sequence[bool] = True) -> None:
        flags = [bool(slots)] * self.batch_size if isinstance(slots, bool) else list(slots)
        start = 0
        for m, b in zip(self.members, self.sizes, strict=True):
            m.commit(flags[start : start + b])
            start += b


def _join_cross(calls: Sequence[ForwardCall]) -> CrossAttentionCache:
    """The members' text K/V, each expanded to its slots, concatenated per block."""
    sizes = [c.x.shape[0] for c in calls]
    blocks = len(calls[0].cross.key)

    def per_block(name: str, i: int) -> torch.Tensor:
        parts = []
        for c, b in zip(calls, sizes, strict=True):
            t = getattr(c.cross, name)[i]
            parts.append(t if t.shape[0] == b else t.expand(b, -1, -1, -1))
        return torch.cat(parts)

    return CrossAttentionCache(key=[per_block("key", i) for i in range(blocks)],
                               value=[per_block("value", i) for i in range(blocks)])  # fmt: skip


def join_calls(calls: Sequence[ForwardCall]) -> ForwardCall:
    """One forward for several sessions' calls (all compatible: :func:`call_key`)."""
    commits: list[bool] = []
    for c in calls:
        b = c.x.shape[0]
        commits += [c.commit] * b if isinstance(c.commit, bool) else list(c.commit)
    cache = cast(KVCache, JoinedKVCache([c.cache for c in calls]))  # forward_stream's use of it: see the class
    return ForwardCall(
        x=torch.cat([c.x for c in calls]),
        t=torch.cat([c.t for c in calls]),
        cross=_join_cross(calls),
        cache=cache,
        commit=True if all(commits) else commits,
        lora=dict(calls[0].lora),
    )


def call_key(call: ForwardCall) -> Hashable:
    """Calls with equal keys can run as one forward (module docstring)."""
    return (tuple(call.x.shape[1:]), call.x.dtype, str(call.x.device), tuple(sorted(call.lora.items())),
            call.cache.tokens_per_frame)  # fmt: skip


@dataclass
class GroupTiming:
    """What one round's forward cost: ``members`` sessions' calls in ``ms``."""

    members: int
    ms: float


def run_together(
    engine: StreamEngine,
    steps: Sequence[Steps[Any]],
    *,
    batch: bool = True,
    on_forward: Callable[[GroupTiming], None] | None = None,
) -> list[Any]:
    """Drive several sessions' steps (``StreamSession.push_steps``) to their end, sharing forwards where the calls
    are compatible (``batch=False``: one forward per call, the same order: the reference). Returns each steps'
    result, or the exception it raised (one session's failure never stops the others). ``on_forward`` gets each
    forward's group size and time (on CUDA that waits for the device after each forward; without it nothing does)."""
    results: list[Any] = [None] * len(steps)
    waiting: dict[int, ForwardCall] = {}

    def advance(i: int, flow: torch.Tensor | None) -> None:
        try:
            call = next(steps[i]) if flow is None else steps[i].send(flow)
        except StopIteration as stop:
            results[i] = stop.value
        except Exception as exc:  # noqa: BLE001 - handed back as that session's result
            results[i] = exc
        else:
            waiting[i] = call

    with torch.inference_mode():
        for i in range(len(steps)):
            advance(i, None)
        while waiting:
            groups: dict[Hashable, list[int]] = {}
            for i, call in waiting.items():
                groups.setdefault(call_key(call) if batch else ("alone", i), []).append(i)
            for members in groups.values():
                calls = [waiting.pop(i) for i in members]
                call = join_calls(calls) if len(calls) > 1 else calls[0]
                started = time.perf_counter()
                try:
                    engine.lora.activate(call.lora)
                    flow = engine.transformer.forward_stream(call.x, call.t, call.cross, call.cache, commit=call.commit)
                    if on_forward is not None:
                        engine.synchronize()  # the forward's time is asked for (CUDA queues it: wait, once)
                except Exception as exc:  # noqa: BLE001 - the members' chunk failed; the others go on
                    for i in members:
                        steps[i].close()
                        results[i] = exc
                    continue
                if on_forward is not None:
                    on_forward(GroupTiming(len(calls), (time.perf_counter() - started) * 1e3))
                for i, part in zip(members, flow.split([c.x.shape[0] for c in calls]), strict=True):
                    advance(i, part)
    return results
