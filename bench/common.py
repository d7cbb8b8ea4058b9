"""Helpers shared by the benchmarks: synthetic input, statistics, the result table and JSON."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import numpy as np


def parse_size(text: str) -> tuple[int, int]:
    """``"1280x720"`` → (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size must look like 1280x720 (got {text!r})") from None
    return w, h


def moving_shapes(width: int, height: int, frames: int, *, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A deterministic clip of coloured shapes drifting over a gradient: real motion for the noise controller."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 * (x + y) / (width + height)], axis=-1) * 200
    centres = rng.uniform(0.2, 0.8, size=(3, 2)) * (width, height)
    velocity = rng.uniform(-3, 3, size=(3, 2))
    colours = rng.uniform(60, 255, size=(3, 3))
    radius = min(width, height) / 6
    clip = np.empty((frames, height, width, channels), dtype=np.uint8)
    for f in range(frames):
        img = base.copy()
        for c, v, col in zip(centres, velocity, colours, strict=True):
            cx, cy = c + v * f
            img[(x - cx % width) ** 2 + (y - cy % height) ** 2 < radius**2] = col
        clip[f, :, :, :3] = img.clip(0, 255).astype(np.uint8)
        if channels == 4:
            clip[f, :, :, 3] = 255
    return clip


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def stamp() -> dict[str, Any]:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def report(title: str, rows: list[tuple[str, Any]], result: dict[str, Any], json_path: str | None) -> None:
    """Print a rich table of ``rows`` and write ``result`` as JSON."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
