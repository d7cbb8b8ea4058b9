"""What crosses the engine's seam: the frames out, the stage timings, and the two protocols a caller (the daemon's
compute loop) relies on, ``Engine`` and ``EngineSession``. ``StreamEngine`` and ``StreamSession`` implement them; a
test stand-in may too. This module imports neither torch nor the model.

A frame's path: ``EngineSession.push(pixels)`` (``Pixels``: H×W×C uint8 in the session's pixel format) → the session's
chunk of RGB float tensors → VAE latents → the causal DiT → VAE pixels → ``list[OutputFrame]`` (``Pixels`` again,
each tagged with the index of the input frame it restyles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..model.configs import CachePolicy
from ..protocol.params import GenerationParams

if TYPE_CHECKING:
    import torch

__all__ = ["Engine", "EngineFailure", "EngineSession", "InsufficientMemory", "OutputFrame", "Pixels", "StageTimes"]

Pixels = npt.NDArray[np.uint8]
"""One frame, ``H×W×C`` uint8 in a session's pixel format (``rgb24``/``bgr24``: C = 3, ``rgba``/``bgra``: C = 4)."""


class EngineFailure(RuntimeError):
    """The engine itself cannot go on (a pipeline rank died): the daemon ends, instead of closing one session."""


class InsufficientMemory(ValueError):
    """A session would not fit in the device's free memory; the message names what would."""


@dataclass
class OutputFrame:
    """A restyled frame; ``index`` is the 0-based count of the input frame it restyles."""

    index: int
    pixels: Pixels


class StageTimes(dict[str, float]):
    """Milliseconds the last chunk spent in each stage, ``encode``, ``dit`` and ``decode``: a ``dict`` (the stats and
    the wire carry it as it is) with the stages as typed attributes, as diffusers' ``BaseOutput`` is."""

    def __init__(self, *, encode: float = 0.0, dit: float = 0.0, decode: float = 0.0) -> None:
        super().__init__(encode=encode, dit=dit, decode=decode)

    @property
    def encode(self) -> float:
        return self["encode"]

    @property
    def dit(self) -> float:
        return self["dit"]

    @property
    def decode(self) -> float:
        return self["decode"]


@runtime_checkable
class EngineSession(Protocol):
    """One live stream as its caller sees it (``StreamSession``)."""

    @property
    def params(self) -> GenerationParams:
        """The parameters in effect."""

    @property
    def latency_frames(self) -> int:
        """Most input frames that arrive after an input frame before its output is ready."""

    @property
    def frames_in(self) -> int: ...

    @property
    def frames_out(self) -> int: ...

    @property
    def stage_ms(self) -> StageTimes:
        """The last chunk's stage timings."""

    def push(self, frame: Pixels) -> list[OutputFrame]:
        """Add one frame; the restyled frames that became ready, in input order (possibly none). A bad frame raises
        ``ValueError`` and changes nothing."""

    def flush(self) -> list[OutputFrame]:
        """End of stream: every pushed frame gets its output."""

    def set_params(self, **changes: Any) -> None:
        """Change ``GenerationParams`` fields between chunks (values validated there: ``ValueError``, nothing
        changed). A prompt change blends over ``transition_chunks``; steps/mode changes drain the pipeline first."""

    # Optional: ``close()``, called once when the caller lets the session go, must return at once (the daemon calls
    # it holding its output thread's lock). The relay's ``RemoteSession`` closes its remote session that way.
    # Optional: ``set_preset(name, changes)``, for a session whose model applies presets itself by name (the relay's
    # RemoteSession: the remote daemon's preset, its LoRA included); the daemon then calls it instead of
    # ``set_lora`` + ``set_params`` for a preset.
    # Optional: ``set_lora(path | None, strength, transition_chunks=None)``, a preset's LoRA style (StreamSession);
    # a missing or mismatched file raises ``ValueError`` and changes nothing.
    # Optional (session batching, ``engine.batch``): ``push_steps(frame)``, ``push`` as a generator of the forwards it
    # needs; ``batch_key()``, sessions with equal keys may share a forward; ``runs_chunk_next``, the next push runs
    # the DiT. The daemon batches only sessions that have all three (StreamSession); others run alone.


@runtime_checkable
class Engine(Protocol):
    """A loaded model that opens sessions (``StreamEngine``)."""

    @property
    def model_name(self) -> str: ...

    @property
    def device(self) -> torch.device | str:
        """Where the model runs (a stand-in may say it as a string)."""

    @property
    def compat(self) -> str:
        """``"upstream"`` (upstream StreamDiffusionV2's quirks, the default) or ``"clean"``: ``configs.check_compat``."""

    @property
    def cache_policy(self) -> CachePolicy | None:
        """The KV cache settings every session gets (``None``: a stand-in without one); ``hello`` and ``status``
        show them."""

    def open_session(
        self, *, width: int, height: int, params: GenerationParams | None = None, pixel_format: str = "rgb24"
    ) -> EngineSession:
        """A new stream at ``width×height`` (multiples of 16); ``ValueError`` for a bad size or format."""

    def encode_prompt(self, prompt: str) -> object:
        """Encode (and keep) a prompt's embedding ahead of use, so a later ``set_params`` with it is instant; the
        first unknown prompt may load the text encoder. Callers rely on the side effect only (``StreamEngine``
        returns the embedding tensor)."""
