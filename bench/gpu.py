"""The one GPU benchmark: the real model shapes (random weights, nothing to download) on one GPU, in one run.

    python bench/gpu.py --json out/gpu.json            # the full set, within ~8 minutes on one H100
    python bench/gpu.py --quick --json out/gpu.json    # steps 1-2, one size
    python bench/gpu.py --device cpu                   # the same script end to end at toy size (tiny model)

For the 1.3B at 480×832 and 512×512: FPS and time to first frame at steps 1-4, stream batch and no-batch, the full
(Wan VAE) and the light (TAEHV) decoder, and the peak memory beside the estimate of ``model.memory``; then the 14B
at 1 step when the estimate fits in the free memory. Each configuration runs ``--repeats`` times, interleaved, and
medians are reported. After the first size's runs the hot loop is compiled in place (``--compile``'s
``engine.compiled``) and that size's stream-batch runs with the full decoder at ``--compile-steps`` are measured
again: ``compiled_fps`` and ``compile_s`` (the compiling warm-up) in their records (``null`` where not measured);
the later sizes run eager (``torch.compiler.set_stance("force_eager")``).
Prints a table and writes JSON (``runs``: one record per configuration; ``skipped``: what did not run and why).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, moving_shapes, parse_size, report, stamp  # noqa: E402
from engine import RandomPromptEmbeddings, run_stream  # noqa: E402

from sdlive.daemon.engine import StreamEngine  # noqa: E402
from sdlive.daemon.engine.compiled import compile_hot_loop  # noqa: E402
from sdlive.daemon.model.bundle import light_decoder_for  # noqa: E402
from sdlive.daemon.model.memory import GiB, estimate, free_device_bytes  # noqa: E402

GPU_SIZES = ("832x480", "512x512")
CPU_SIZES = ("64x48",)


def _engine(model: str, device: str) -> StreamEngine:
    engine = StreamEngine.load(model, device=device, random_weights=True)
    if model != "tiny":  # a random 5.7B text encoder would cost minutes and memory: embeddings of the real shape
        engine.bundle.text = RandomPromptEmbeddings(engine.spec.text_len, engine.spec.text_dim)  # type: ignore[assignment]
    return engine


def _peak_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_model(
    model: str, device: str, sizes: tuple[str, ...], steps_list: tuple[int, ...], *, frames: int, repeats: int,
    deadline: float, decoders: tuple[str, ...], runs: list[dict[str, Any]], skipped: list[str],
    compile_steps: tuple[int, ...] = (),
) -> None:  # fmt: skip
    engine = _engine(model, device)
    light, _ = light_decoder_for(engine.spec, None, None, device=engine.device, dtype=engine.dtype)
    for i, size in enumerate(sizes):
        # Once the hot loop is compiled in place (after the first size), the later sizes' eager figures run eager.
        stance = torch.compiler.set_stance("force_eager") if i > 0 and compile_steps else contextlib.nullcontext()
        with stance:
            bench_size(engine, light, size, steps_list, frames=frames, repeats=repeats, deadline=deadline,
                       decoders=decoders, runs=runs, skipped=skipped)  # fmt: skip
        if i == 0 and compile_steps:  # right after the first size's eager runs, so the time budget reaches them
            bench_compiled(engine, size, compile_steps, frames=frames, repeats=repeats, deadline=deadline,
                           runs=runs, skipped=skipped)  # fmt: skip
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_size(
    engine: StreamEngine, light: Any, size: str, steps_list: tuple[int, ...], *, frames: int, repeats: int,
    deadline: float, decoders: tuple[str, ...], runs: list[dict[str, Any]], skipped: list[str],
) -> None:  # fmt: skip
    """Every configuration of one size, eager: a record each in ``runs``."""
    model = engine.model_name
    width, height = parse_size(size)
    clip = moving_shapes(width, height, frames)
    engine.bundle.light_decoder = None
    run_stream(engine, clip[:13], steps=1, stream_batch=True)  # warm-up: kernels, allocator
    for steps in steps_list:
        for stream_batch in (True, False) if steps > 1 else (True,):
            for decoder in decoders:
                mode = "stream batch" if stream_batch and steps > 1 else ("no-batch" if steps > 1 else "-")
                what = f"{model} {size} {steps} step(s) {mode} {decoder}"
                if time.monotonic() > deadline:
                    skipped.append(f"{what}: out of the time budget")
                    continue
                engine.bundle.light_decoder = light if decoder == "light" else None
                fps, ttff, peaks = [], [], []
                for _ in range(repeats):
                    _reset_peak(engine.device)
                    r = run_stream(engine, clip, steps=steps, stream_batch=stream_batch)
                    fps.append(r["fps"])
                    ttff.append(r["ttff_s"])
                    peak = _peak_bytes(engine.device)
                    if peak is not None:
                        peaks.append(peak)
                est = estimate(engine.spec, width=width, height=height, steps=steps, stream_batch=stream_batch,
                               dtype=engine.dtype, decoder=decoder)  # fmt: skip
                runs.append({
                    "model": model, "size": size, "steps": steps, "mode": mode, "decoder": decoder,
                    "fps": median(fps), "ttff_s": median(ttff), "compiled_fps": None, "compile_s": None,
                    "peak_gib": max(peaks) / GiB if peaks else None, "estimate_gib": est.total / GiB,
                })  # fmt: skip
    engine.bundle.light_decoder = None


def bench_compiled(
    engine: StreamEngine, size: str, steps_list: tuple[int, ...], *, frames: int, repeats: int, deadline: float,
    runs: list[dict[str, Any]], skipped: list[str],
) -> None:  # fmt: skip
    """Compile ``engine``'s hot loop in place and fill ``compiled_fps`` / ``compile_s`` of its eager records."""
    compile_hot_loop(engine.bundle)
    width, height = parse_size(size)
    clip = moving_shapes(width, height, frames)
    for steps in steps_list:
        what = f"{engine.model_name} {size} {steps} step(s) compiled"
        record = next((r for r in runs if r["model"] == engine.model_name and r["size"] == size
                       and r["steps"] == steps and r["mode"] in ("stream batch", "-") and r["decoder"] == "full"), None)  # fmt: skip
        if record is None:
            continue
        if time.monotonic() > deadline:
            skipped.append(f"{what}: out of the time budget")
            continue
        started = time.perf_counter()
        run_stream(engine, clip[:13], steps=steps, stream_batch=True)  # compiles this shape
        record["compile_s"] = time.perf_counter() - started
        record["compiled_fps"] = median([run_stream(engine, clip, steps=steps, stream_batch=True)["fps"]
                                         for _ in range(repeats)])  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu (toy size)")
    parser.add_argument("--quick", action="store_true", help="steps 1-2, the first size only, 1 repeat")
    parser.add_argument("--frames", type=int, default=None, help="frames per run (default: 64 GPU, 29 CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration (default: 2, quick: 1)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; configurations past it are skipped")
    parser.add_argument("--compile-steps", default="1,2", help="steps measured compiled too (quick: 1); '' for none")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    compile_steps = tuple(int(v) for v in args.compile_steps.split(",") if v.strip())
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    started = time.monotonic()
    deadline = started + args.budget
    sizes = GPU_SIZES if on_gpu else CPU_SIZES
    steps_list: tuple[int, ...] = (1, 2, 3, 4)
    repeats = args.repeats or 2
    if args.quick:
        sizes, steps_list, repeats = sizes[:1], (1, 2), args.repeats or 1
        compile_steps = compile_steps[:1]
    frames = args.frames or (64 if on_gpu else 29)
    runs: list[dict[str, Any]] = []
    skipped: list[str] = []
    small = "wan2.1-1.3b" if on_gpu else "tiny"
    bench_model(small, device, sizes, steps_list, frames=frames, repeats=repeats, deadline=deadline,
                decoders=("full", "light"), runs=runs, skipped=skipped, compile_steps=compile_steps)  # fmt: skip
    if on_gpu:
        width, height = parse_size(sizes[0])
        need = estimate("wan2.1-14b", width=width, height=height, steps=1).total
        free = free_device_bytes(device) or 0
        if need > free:
            skipped.append(f"wan2.1-14b: needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB free")
        elif time.monotonic() > deadline:
            skipped.append("wan2.1-14b: out of the time budget")
        else:
            bench_model("wan2.1-14b", device, sizes[:1], (1,), frames=frames, repeats=1, deadline=deadline,
                        decoders=("full",), runs=runs, skipped=skipped)  # fmt: skip
    else:
        skipped.append("wan2.1-14b: GPU only")
    name = torch.cuda.get_device_name(torch.device(device)) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    result = {**stamp(), "device": name, "quick": args.quick, "frames": frames, "repeats": repeats,
              "wall_s": time.monotonic() - started, "runs": runs, "skipped": skipped}  # fmt: skip
    rows: list[tuple[str, Any]] = [("device", name)]
    for r in runs:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        compiled = f", compiled {r['compiled_fps']:.2f} fps" if r["compiled_fps"] is not None else ""
        rows.append((f"{r['model']} {r['size']} {r['steps']}st {r['mode']} {r['decoder']}",
                     f"{r['fps']:.2f} fps, ttff {r['ttff_s']:.2f} s, peak {peak} / est {r['estimate_gib']:.1f} GiB"
                     f"{compiled}"))  # fmt: skip
    for s in skipped:
        rows.append(("skipped", s))
    report("sdlive GPU benchmark", rows, result, args.json)
    return result


if __name__ == "__main__":
    main()
