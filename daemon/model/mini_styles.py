"""The styles of the ``mini`` model: what each of its prompts means, as a classic image filter.

``mini`` (see ``docs/mini.md``) was trained to map a video toward these filtered versions of itself; the filters are
its training targets and the reference its evaluation (``bench/mini_quality.py``) and tests compare against. They
are plain OpenCV/numpy operations on ``H×W×3`` uint8 RGB frames (no torch), cheap enough to run per frame.

The prompt vocabulary is :data:`MINI_STYLES`'s keys; :func:`style_names` lists them in training order (the row of
each style's prompt embedding in the shipped weights).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import numpy.typing as npt

__all__ = ["MINI_STYLES", "RGB", "style_names", "stylize"]

RGB = npt.NDArray[np.uint8]
"""One frame, ``H×W×3`` uint8 RGB."""


def _gray(rgb: RGB) -> npt.NDArray[np.uint8]:
    return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.uint8)


def pencil_sketch(rgb: RGB) -> RGB:
    """Graphite on paper: OpenCV's ``pencilSketch`` (the monochrome result), a little softened."""
    gray, _colour = cv2.pencilSketch(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), sigma_s=30, sigma_r=0.08, shade_factor=0.06)
    return np.asarray(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), dtype=np.uint8)


def cartoon(rgb: RGB) -> RGB:
    """Edge-preserving cartoon: bilateral smoothing, colours quantised to 5 levels a channel, dark outlines."""
    smooth = cv2.bilateralFilter(rgb, 9, 60, 9)
    smooth = cv2.bilateralFilter(smooth, 9, 60, 9)
    levels = 5
    step = 256 // levels
    flat = (smooth // step) * step + step // 2
    edges = cv2.adaptiveThreshold(cv2.medianBlur(_gray(rgb), 5), 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 9, 4)
    edges = cv2.erode(edges, np.ones((2, 2), np.uint8))
    return np.where(edges[..., None] > 0, flat, flat // 4).astype(np.uint8)


def thermal(rgb: RGB) -> RGB:
    """A thermal camera: luminance through the ``inferno`` colour map."""
    return np.asarray(cv2.cvtColor(cv2.applyColorMap(_gray(rgb), cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB), np.uint8)


def pop_art(rgb: RGB) -> RGB:
    """Posterised pop art: saturation boosted, then 2 levels a channel (8 flat primary colours)."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.8 + 40, 0, 255)
    boosted = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return np.where(boosted > 110, 235, 25).astype(np.uint8)


def sepia(rgb: RGB) -> RGB:
    """An old sepia photograph: the classic sepia matrix, lowered contrast and a vignette."""
    m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32)
    x = rgb.astype(np.float32) @ m.T
    x = 0.8 * x + 20
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
    x = x * (1 - 0.35 * np.clip(r2 / 2, 0, 1))[..., None]
    return np.clip(x, 0, 255).astype(np.uint8)


def cyanotype(rgb: RGB) -> RGB:
    """A cyanotype print: luminance mapped from Prussian blue to pale cyan-white."""
    g = _gray(rgb).astype(np.float32)[..., None] / 255.0
    dark = np.array([16, 38, 92], np.float32)
    light = np.array([225, 240, 250], np.float32)
    return np.clip(dark + (light - dark) * g**0.9, 0, 255).astype(np.uint8)


def watercolor(rgb: RGB) -> RGB:
    """A pastel watercolour: OpenCV's ``stylization`` (edge-aware smoothing), washed out toward warm paper."""
    painted = cv2.stylization(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), sigma_s=45, sigma_r=0.5)
    painted = cv2.cvtColor(painted, cv2.COLOR_BGR2RGB).astype(np.float32)
    paper = np.array([250, 244, 228], np.float32)
    return np.clip(0.6 * painted + 0.4 * paper, 0, 255).astype(np.uint8)


MINI_STYLES: dict[str, Callable[[RGB], RGB]] = {
    "pencil sketch": pencil_sketch,
    "cartoon": cartoon,
    "thermal camera": thermal,
    "pop art": pop_art,
    "sepia photo": sepia,
    "cyanotype": cyanotype,
    "watercolor": watercolor,
}
"""mini's prompts, each with the filter it was trained to imitate (insertion order = embedding row)."""


def style_names() -> list[str]:
    """mini's prompts in embedding-row order."""
    return list(MINI_STYLES)


def stylize(style: str, rgb: RGB) -> RGB:
    """``rgb`` (``H×W×3`` uint8) in the style ``style`` (one of :func:`style_names`); ``ValueError`` otherwise."""
    if style not in MINI_STYLES:
        raise ValueError(f"unknown mini style {style!r}: expected one of {', '.join(repr(s) for s in MINI_STYLES)}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 uint8 RGB frame, got {rgb.dtype} {rgb.shape}")
    return MINI_STYLES[style](np.ascontiguousarray(rgb))
