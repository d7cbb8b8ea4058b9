"""The one check every frame handed to the client side passes (the session's ``send``, every sink's ``write``)."""

from __future__ import annotations

import numpy as np

__all__ = ["check_frame"]


def check_frame(frame: object, shape: tuple[int, ...], *, context: str = "") -> np.ndarray:
    """``frame`` as a C-contiguous ``uint8`` array of exactly ``shape`` (H×W×C); a TypeError / ValueError saying
    what is wrong otherwise (``context`` is appended to a shape mismatch, e.g. what the session is)."""
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"frame must be a numpy array, not {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"unexpected frame dtype: {frame.dtype} != uint8")
    if frame.shape != shape:
        raise ValueError(f"unexpected frame shape: {frame.shape} != {shape}{f' ({context})' if context else ''}")
    return np.ascontiguousarray(frame)
