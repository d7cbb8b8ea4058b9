"""Offline training and evaluation data for ``mini``: scikit-image's sample images turned into video.

A clip is a virtual camera moving over one sample image (pan, zoom, shake, a slight rotation) with a few moving
objects composited on top (discs, boxes and ellipses, flat-coloured or cut from another image). Everything comes from
one ``numpy`` generator, so a seed gives the same clips on every machine. The images are split once, by name, into
training and held-out sets (:data:`HELD_OUT`): evaluation never sees a training image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
import numpy.typing as npt

RGB = npt.NDArray[np.uint8]

HELD_OUT = ("chelsea", "coffee", "rocket")
"""Colour images kept out of every training stage (the evaluation's images)."""
TRAIN_COLOUR = ("astronaut", "color", "hubble_deep_field", "ihc", "logo", "motorcycle_left",
                "motorcycle_right", "retina", "chessboard_RGB")  # fmt: skip
TRAIN_GRAY = ("brick", "camera", "cell", "clock_motion", "coins", "grass", "gravel", "horse", "microaneurysms", "moon",
              "page", "text")  # fmt: skip
_JPG = ("hubble_deep_field", "retina", "rocket")


@cache
def load_image(name: str) -> RGB:
    """The scikit-image sample image ``name`` as RGB uint8 (grey images as three equal channels, at least 512 px on
    the short side, so a 256×256 crop has room to move)."""
    from pathlib import Path

    import skimage.data
    from skimage import io

    folder = Path(skimage.data.__file__).parent  # the images that ship inside scikit-image's wheel (no download)
    img = np.asarray(io.imread(folder / f"{name}.{'jpg' if name in _JPG else 'png'}"))
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(float(img.max()), 1e-9))).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    short = min(img.shape[:2])
    if short < 512:
        scale = 512 / short
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(img)


def train_images() -> list[str]:
    """The training images' names (colour ones listed twice: most of what a camera sees is colour)."""
    return [*TRAIN_COLOUR, *TRAIN_COLOUR, *TRAIN_GRAY]


def _jitter_colour(img: RGB, rng: np.random.Generator) -> RGB:
    """A random hue rotation, saturation and brightness change (more colours from few images)."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(0, 180)) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.4), 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(0.75, 1.2), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


@dataclass
class _Sprite:
    kind: str
    colour: tuple[int, int, int]
    texture: RGB | None
    pos: npt.NDArray[np.float64]
    vel: npt.NDArray[np.float64]
    size: npt.NDArray[np.float64]
    angle: float
    spin: float


def make_clip(
    image: str | RGB,
    frames: int,
    size: int,
    rng: np.random.Generator,
    *,
    motion: float = 1.0,
    objects: int | None = None,
    jitter: bool = True,
) -> npt.NDArray[np.uint8]:
    """``frames`` frames ``[T, size, size, 3]`` of a camera moving over ``image`` (a name or an RGB array).

    ``motion`` scales the camera's speed (0: a still camera, 1: typical, 2: fast); ``objects``: moving objects on
    top (default 0–3 at random)."""
    src = load_image(image) if isinstance(image, str) else image
    if jitter and rng.random() < 0.7:
        src = _jitter_colour(src, rng)
    h, w = src.shape[:2]
    # The camera: a window of side `view` (pixels of the source) centred at `centre`, rotated by `angle`.
    view0 = rng.uniform(0.35, 0.9) * min(h, w)
    zoom_rate = rng.uniform(-0.015, 0.015) * motion
    centre = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h])
    pan = rng.normal(0, 0.012, 2) * view0 * motion
    shake = rng.uniform(0, 0.01) * view0 * motion
    angle0, spin = rng.uniform(-8, 8), rng.normal(0, 0.3) * motion
    n_obj = int(rng.integers(0, 4)) if objects is None else objects
    sprites = []
    for _ in range(n_obj):
        texture = None
        if rng.random() < 0.4:
            other = load_image(str(rng.choice(TRAIN_COLOUR if isinstance(image, str) and image not in HELD_OUT
                                              else HELD_OUT)))  # fmt: skip
            texture = cv2.resize(other, (size, size), interpolation=cv2.INTER_AREA)
        sprites.append(
            _Sprite(
                kind=str(rng.choice(["disc", "box", "ellipse"])),
                colour=tuple(int(c) for c in rng.integers(0, 256, 3)),  # type: ignore[arg-type]
                texture=texture,
                pos=rng.uniform(0.15, 0.85, 2) * size,
                vel=rng.normal(0, 0.012, 2) * size * max(motion, 0.3),
                size=rng.uniform(0.08, 0.25, 2) * size,
                angle=float(rng.uniform(0, 180)),
                spin=float(rng.normal(0, 3)),
            )
        )
    out = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        view = view0 * (1 + zoom_rate) ** f
        c = centre + pan * f + rng.normal(0, 1, 2) * shake
        c = np.clip(c, view / 2, [w - view / 2, h - view / 2]) if view < min(h, w) else np.array([w / 2, h / 2])
        scale = size / view
        m = cv2.getRotationMatrix2D((float(c[0]), float(c[1])), angle0 + spin * f, scale)
        m[:, 2] += np.array([size / 2, size / 2]) - c
        frame = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        for s in sprites:
            p = s.pos + s.vel * f
            mask = np.zeros((size, size), np.uint8)
            centre_px = (int(p[0]), int(p[1]))
            axes = (max(2, int(s.size[0] / 2)), max(2, int(s.size[1] / 2)))
            if s.kind == "disc":
                cv2.circle(mask, centre_px, axes[0], 255, -1, cv2.LINE_AA)
            elif s.kind == "ellipse":
                cv2.ellipse(mask, centre_px, axes, s.angle + s.spin * f, 0, 360, 255, -1, cv2.LINE_AA)
            else:
                box = cv2.boxPoints(((p[0], p[1]), (2 * axes[0], 2 * axes[1]), s.angle + s.spin * f))
                cv2.fillConvexPoly(mask, box.astype(np.int32), 255, cv2.LINE_AA)
            fill = s.texture if s.texture is not None else np.full_like(frame, s.colour)
            a = mask[..., None].astype(np.float32) / 255
            frame = (frame * (1 - a) + fill * a).astype(np.uint8)
        out[f] = frame
    return out


def held_out_crop(name: str, size: int = 256) -> RGB:
    """A centre crop of the held-out image ``name``, its short side resized to ``size`` (evaluation frames)."""
    img = load_image(name)
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return cv2.resize(img[top : top + s, left : left + s], (size, size), interpolation=cv2.INTER_AREA)
