"""Quality of the shipped ``mini`` model on held-out data (images never seen in training, ``tools/mini_data.py``).

    python bench/mini_quality.py --json out/mini_quality.json [--weights FOLDER] [--frames 33] [--threads 2]

Everything runs through the engine (``StreamEngine.load("mini")``, sessions pushed frame by frame), as ``sdlive``
runs it. Prints tables and writes JSON with:

* ``vae``: reconstruction of the streaming VAE (encode one frame, decode it, the engine's decoder-input rounding
  included) on held-out 256×256 crops: PSNR and SSIM per image and their mean;
* ``fidelity``: per ``mini-*`` preset, on a held-out moving clip per image, the mean absolute error (0–255) of the
  output to every style's target of the same input frames and to the input; ``own_closest`` is true when the
  preset's own target is nearer than every other target and the input;
* ``consistency``: warp error on a moving held-out clip (the previous output frame warped by Farneback flow computed
  on the input, mean absolute difference to the current output, 0–255) for the full system, without KV cache
  context (a fresh cache every chunk) and without the motion-aware noise controller (motion read as 0), for each
  preset, plus the same error of the input clip and of the per-frame style target (what a perfect per-frame filter
  gives).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from common import report, stamp  # noqa: E402
from mini_data import HELD_OUT, held_out_crop, load_image, make_clip  # noqa: E402

from sdlive.daemon.engine import SessionParams, StreamEngine  # noqa: E402
from sdlive.daemon.engine.schedule import NoiseController  # noqa: E402
from sdlive.daemon.model.mini_styles import stylize  # noqa: E402
from sdlive.daemon.presets import Preset, load_presets  # noqa: E402

SIZE = 256


def mini_presets() -> list[Preset]:
    """The shipped ``mini-*`` presets, by name."""
    library = load_presets(user=False)
    return [library.presets[n] for n in sorted(library.presets) if n.startswith("mini-")]


def held_out_crops() -> list[tuple[str, np.ndarray]]:
    """Five 256×256 views per held-out image: the centre crop and four corner crops of a 360 px resize."""
    out = []
    for name in HELD_OUT:
        out.append((f"{name}/centre", held_out_crop(name, SIZE)))
        img = load_image(name)
        scale = 360 / min(img.shape[:2])
        big = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        h, w = big.shape[:2]
        for tag, (y, x) in {"tl": (0, 0), "tr": (0, w - SIZE), "bl": (h - SIZE, 0), "br": (h - SIZE, w - SIZE)}.items():
            out.append((f"{name}/{tag}", big[y : y + SIZE, x : x + SIZE]))
    return out


@torch.inference_mode()
def vae_quality(engine: StreamEngine) -> dict[str, Any]:
    from skimage.metrics import structural_similarity

    rows = {}
    for name, img in held_out_crops():
        vae = engine.new_vae()
        x = torch.from_numpy(img).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
        y = vae.decode(vae.encode(x.to(engine.device)))
        rec = ((y[0, :, 0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        mse = np.mean((rec.astype(np.float64) - img) ** 2)
        psnr = 10 * np.log10(255**2 / max(mse, 1e-10))
        ssim = structural_similarity(img, rec, channel_axis=2, data_range=255)
        rows[name] = {"psnr": float(psnr), "ssim": float(ssim)}
    return {
        "images": rows,
        "psnr_mean": float(np.mean([r["psnr"] for r in rows.values()])),
        "ssim_mean": float(np.mean([r["ssim"] for r in rows.values()])),
    }


class _StillController(NoiseController):
    """The noise controller with its motion estimate switched off (every chunk reads as still): fixed noise."""

    @staticmethod
    def motion(frames: torch.Tensor) -> float:
        return 0.0


@torch.inference_mode()
def stream(engine: StreamEngine, clip: np.ndarray, preset: Preset, variant: str = "full") -> np.ndarray:
    """``clip`` [T, H, W, 3] through a session with ``preset``'s settings; ``variant``: ``full``, ``no-kv`` (a fresh
    KV cache for every chunk) or ``no-controller`` (fixed noise)."""
    params = SessionParams(prompt=preset.prompt, steps=preset.steps, noise_scale=preset.noise_scale, seed=preset.seed)
    session = engine.open_session(width=clip.shape[2], height=clip.shape[1], params=params)
    if variant == "no-controller":
        session._controller = _StillController(preset.noise_scale)
    elif variant == "no-kv":
        run_chunk = session._run_chunk

        def fresh_cache_chunk(needed: int) -> Any:  # a generator of the forwards to run, as _run_chunk is
            session._seq_cache = None  # the chunk sees no earlier chunk (1 step: the batch-1 cache is the only one)
            session._batch_cache = None
            return (yield from run_chunk(needed))

        session._run_chunk = fresh_cache_chunk  # type: ignore[method-assign]
    elif variant != "full":
        raise ValueError(variant)
    out: dict[int, np.ndarray] = {}
    for frame in clip:
        for o in session.push(frame):
            out[o.index] = o.pixels
    for o in session.flush():
        out[o.index] = o.pixels
    return np.stack([out[i] for i in range(len(clip))])


def warp_error(frames: np.ndarray, guide: np.ndarray) -> float:
    """Mean |frame_t − warp(frame_{t−1})| (0–255) with the flow t → t−1 computed on ``guide`` (Farneback), over the
    pixels whose source lies inside the frame."""
    errs = []
    h, w = guide.shape[1:3]
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    for t in range(1, len(frames)):
        g0 = cv2.cvtColor(guide[t], cv2.COLOR_RGB2GRAY)
        g1 = cv2.cvtColor(guide[t - 1], cv2.COLOR_RGB2GRAY)
        flow = cv2.calcOpticalFlowFarneback(g0, g1, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        mx, my = gx + flow[..., 0], gy + flow[..., 1]
        warped = cv2.remap(frames[t - 1], mx, my, cv2.INTER_LINEAR)
        valid = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
        diff = np.abs(frames[t].astype(np.float32) - warped.astype(np.float32)).mean(axis=2)
        errs.append(float(diff[valid].mean()))
    return float(np.mean(errs))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a mini weights folder (default: the shipped weights)")
    parser.add_argument("--frames", type=int, default=33, help="frames per held-out clip")
    parser.add_argument("--skip", type=int, default=9, help="leading frames left out of the scores (warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--images", type=Path, default=None,
                        help="write side-by-side pictures here (per held-out clip: input | each style's target over "
                             "mini's output)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = StreamEngine.load("mini", weights=args.weights, device="cpu")
    presets = mini_presets()
    styles = [p.prompt for p in presets]

    vae = vae_quality(engine)
    rows: list[tuple[str, Any]] = [("VAE PSNR dB (held-out 256x256, mean)", vae["psnr_mean"]),
                                   ("VAE SSIM (mean)", vae["ssim_mean"])]  # fmt: skip

    # Style fidelity: one moving clip per held-out image, every preset.
    clips = {name: make_clip(name, args.frames, SIZE, np.random.default_rng([7, i]), motion=1.0, objects=2,
                             jitter=False) for i, name in enumerate(HELD_OUT)}  # fmt: skip
    targets = {name: {s: np.stack([stylize(s, f) for f in clip]) for s in styles} for name, clip in clips.items()}
    outputs = {p.name: {name: stream(engine, clip, p) for name, clip in clips.items()} for p in presets}
    fidelity: dict[str, Any] = {}
    sl = slice(args.skip, None)
    for p in presets:
        dist = {}
        for s in styles:
            dist[s] = float(np.mean([np.abs(outputs[p.name][n][sl].astype(np.float32) - targets[n][s][sl]).mean()
                                     for n in clips]))  # fmt: skip
        dist["input"] = float(np.mean([np.abs(outputs[p.name][n][sl].astype(np.float32) - clips[n][sl]).mean()
                                       for n in clips]))  # fmt: skip
        others = [v for k, v in dist.items() if k != p.prompt]
        fidelity[p.name] = {"prompt": p.prompt, "mae": dist, "own_closest": bool(dist[p.prompt] < min(others))}
    rows.append(("presets whose own target is closest", f"{sum(f['own_closest'] for f in fidelity.values())}"
                                                         f"/{len(fidelity)}"))  # fmt: skip

    if args.images is not None:
        write_pictures(args.images, clips, targets, outputs, presets)

    # Temporal consistency on the moving clip of the first held-out image (the full run is reused from above).
    name = HELD_OUT[0]
    clip = clips[name]
    consistency: dict[str, Any] = {"clip": name, "input": warp_error(clip[sl], clip[sl]), "presets": {}}
    for p in presets:
        entry = {"target": warp_error(targets[name][p.prompt][sl], clip[sl]),
                 "full": warp_error(outputs[p.name][name][sl], clip[sl])}  # fmt: skip
        for variant in ("no-kv", "no-controller"):
            entry[variant] = warp_error(stream(engine, clip, p, variant)[sl], clip[sl])
        consistency["presets"][p.name] = entry
    for key in ("target", "full", "no-kv", "no-controller"):
        consistency[f"mean_{key}"] = float(np.mean([e[key] for e in consistency["presets"].values()]))
    rows += [(f"warp error {k} (mean over presets)", consistency[f"mean_{k}"])
             for k in ("full", "no-kv", "no-controller", "target")]  # fmt: skip
    rows.append(("warp error of the input itself", consistency["input"]))

    result = {**stamp(), "device": f"cpu ({torch.get_num_threads()} threads)", "frames": args.frames,
              "skip": args.skip, "vae": vae, "fidelity": fidelity, "consistency": consistency}  # fmt: skip
    _print_fidelity(fidelity, styles)
    report("sdlive mini: held-out quality", rows, result, args.json)
    return result


def write_pictures(folder: Path, clips: dict[str, np.ndarray], targets: dict[str, dict[str, np.ndarray]],
                   outputs: dict[str, dict[str, np.ndarray]], presets: list[Preset]) -> None:  # fmt: skip
    """``mini_<image>.png`` per held-out clip (its last frame): a top row of the input and every style's target, a
    bottom row of the input again and mini's output for each preset, labelled."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, clip in clips.items():
        t = len(clip) - 1
        top = [clip[t]] + [targets[name][p.prompt][t] for p in presets]
        bottom = [clip[t]] + [outputs[p.name][name][t] for p in presets]
        labels = ["input"] + [p.prompt for p in presets]
        tiles = []
        for row, kind in ((top, "target"), (bottom, "mini")):
            cells = []
            for img, label in zip(row, labels, strict=True):
                cell = cv2.resize(img, (192, 192), interpolation=cv2.INTER_AREA).copy()
                text = label if label == "input" else f"{label} ({kind})"
                cv2.putText(cell, text, (4, 186), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 3, cv2.LINE_AA)
                cv2.putText(cell, text, (4, 186), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
                cells.append(cell)
            tiles.append(np.concatenate(cells, axis=1))
        picture = np.concatenate(tiles, axis=0)
        cv2.imwrite(str(folder / f"mini_{name}.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))


def _print_fidelity(fidelity: dict[str, Any], styles: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mini style fidelity: mean |output - target| (0-255), held-out clips; * = smallest")
    table.add_column("preset")
    for s in [*styles, "input"]:
        table.add_column(s, justify="right")
    for name, f in fidelity.items():
        best = min(f["mae"].values())
        table.add_row(name, *[f"{'*' if v == best else ''}{v:.1f}" for v in f["mae"].values()])
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
