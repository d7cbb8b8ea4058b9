"""Engine benchmark: throughput, time to first frame and stage times of the streaming loop.

    python bench/engine.py --model tiny --size 256x256 --steps 1 --frames 64 --json out/engine.json

Prints a table and writes JSON with ``fps``, ``ttff_s``, ``stage_ms`` (encode/dit/decode medians),
``recompute_ratio`` (our streaming DiT loop over a baseline that recomputes the whole attention window every chunk:
same weights, same run), ``stream_batch_ratio`` (stream batch over no-batch at 2 steps, same run),
``host_syncs_per_chunk`` (device→host reads per steady chunk, counted by ``engine.syncs.HostSyncCounter``; the
kinds in ``host_syncs_by_kind``), ``compiled_fps`` and ``compiled_over_eager`` (the same stream on an engine with
``--compile``'s hot loop, ``engine.compiled``, interleaved with the eager runs; ``compile_s``: its warm-up, the
compilation; ``compiled_stage_ms``), ``device``.
``--model wan2.1-1.3b --size 480x832`` runs the real shapes with random weights (``--random-weights``), for GPUs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, moving_shapes, parse_size, report, stamp  # noqa: E402

from sdlive.daemon.engine import SessionParams, StreamEngine  # noqa: E402
from sdlive.daemon.engine.schedule import timesteps_for  # noqa: E402
from sdlive.daemon.model.configs import CachePolicy  # noqa: E402


class RandomPromptEmbeddings:
    """Seeded random prompt embeddings of the real shape, for random-weight benchmarks."""

    def __init__(self, text_len: int, text_dim: int) -> None:
        self.shape = (1, text_len, text_dim)

    def encode(self, prompt: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(sum(prompt.encode()))
        return torch.randn(self.shape, generator=generator)


def bench_prompt(engine: StreamEngine) -> str:
    """The benchmark's prompt: a watercolour, in words the model knows (``mini`` takes only its own style prompts)."""
    vocabulary = engine.prompt_vocabulary
    return "a watercolor painting" if vocabulary is None else ("watercolor" if "watercolor" in vocabulary else vocabulary[0])


def run_stream(engine: StreamEngine, clip, *, steps: int, stream_batch: bool, log_iterations: bool = False) -> dict:
    """Push the clip as fast as the engine takes it; returns timing figures."""
    n, height, width = clip.shape[0], clip.shape[1], clip.shape[2]
    params = SessionParams(prompt=bench_prompt(engine), steps=steps, stream_batch=stream_batch, seed=0)
    session = engine.open_session(width=width, height=height, params=params, pixel_format="rgb24")
    stages: dict[str, list[float]] = {"encode": [], "dit": [], "decode": []}
    first_out = None
    outputs = 0
    steady_start = None
    steady_frames = 0
    start = time.perf_counter()
    for i in range(n):
        chunks_before = session.chunks
        out = session.push(clip[i])
        if session.chunks != chunks_before:
            for key in stages:
                stages[key].append(session.stage_ms[key])
            if log_iterations:  # per-chunk detail, off by default (vLLM's log_iteration_details habit)
                print(f"chunk {session.chunks}: {session.stage_ms}", file=sys.stderr)
        if out and first_out is None:
            first_out = time.perf_counter() - start
            steady_start = time.perf_counter()
        elif out:
            steady_frames += len(out)
        outputs += len(out)
    steady_s = time.perf_counter() - steady_start if steady_start else float("nan")
    return {
        "ttff_s": first_out,
        "fps": steady_frames / steady_s if steady_frames else float("nan"),
        "frames_out": outputs,
        "stage_ms": {k: median(v[1:] or v) for k, v in stages.items()},  # the first chunk (5 frames, all steps) aside
        "chunk_ms": median([sum(x) for x in zip(*(v[1:] for v in stages.values()), strict=True)]),
    }


@torch.inference_mode()
def recompute_baseline_dit_ms(engine: StreamEngine, width: int, height: int, steps: int, chunks: int) -> float:
    """DiT time per chunk when every chunk recomputes its whole attention window (num_kv_cache latent frames plus
    the new one) from scratch, instead of reusing cached keys and values."""
    spec = engine.spec
    tokens = (height // 16) * (width // 16)
    window = spec.kv_cache.num_kv_cache + 1
    whole_window = CachePolicy(num_kv_cache=window, num_sink=0, sink_threshold=-1, rope_refresh_frames=0)
    x = torch.randn(1, 16, window, height // 8, width // 8, device=engine.device, dtype=engine.dtype)
    cross = engine.transformer.cross_attention_cache(engine.encode_prompt(bench_prompt(engine)))
    times = []
    for _ in range(chunks):
        t0 = time.perf_counter()
        for step in timesteps_for(steps):
            cache = engine.transformer.new_kv_cache(
                batch_size=1,
                tokens_per_frame=tokens,
                policy=whole_window,
                device=engine.device,
                dtype=engine.dtype,
            )
            t = torch.tensor([step], device=engine.device, dtype=torch.float32)
            engine.transformer.forward_stream(x, t, cross, cache, commit=True)
        engine.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def count_host_syncs(engine: StreamEngine, clip, *, steps: int) -> tuple[float, dict[str, float]]:
    """Device→host reads per steady chunk (after the cache is full), the engine's synchronize calls included."""
    from sdlive.daemon.engine.syncs import HostSyncCounter

    params = SessionParams(prompt=bench_prompt(engine), steps=steps, stream_batch=True, seed=0)
    height, width = clip.shape[1], clip.shape[2]
    session = engine.open_session(width=width, height=height, params=params, pixel_format="rgb24")
    warm = 5 + 4 * 8  # past the fill phase (6 cache frames) and the stream batch's warm-up
    frames = [clip[i % len(clip)] for i in range(warm + 4 * 4)]
    for frame in frames[:warm]:
        session.push(frame)
    counter = HostSyncCounter()
    synchronize = engine.synchronize

    def counted_synchronize() -> None:
        counter.note("synchronize")
        synchronize()

    engine.synchronize = counted_synchronize  # type: ignore[method-assign]
    try:
        chunks_before = session.chunks
        with counter:
            for frame in frames[warm:]:
                session.push(frame)
        chunks = session.chunks - chunks_before
    finally:
        del engine.synchronize  # the class's own method again
    return counter.total / chunks, {k: v / chunks for k, v in sorted(counter.by_kind.items())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", default="256x256", help="WIDTHxHEIGHT, multiples of 16")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--weights", default=None, help="checkpoint path (default: the model's own lookup)")
    parser.add_argument(
        "--allow-base-model", action="store_true", help="run a base Wan transformer when no generator is found"
    )
    parser.add_argument(
        "--random-weights", action="store_true", help="the model's real shapes with seeded random weights (no download)"
    )
    parser.add_argument(
        "--compat", choices=("upstream", "clean"), default="upstream", help="upstream's quirks (default) or sdlive's rule"
    )
    parser.add_argument("--decoder", choices=("full", "light"), default="full", help="the Wan VAE's decoder or TAEHV")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration (medians)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--log-iterations", action="store_true", help="print every chunk's stage times")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled engine")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled engine (compiled_* keys: null)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    width, height = parse_size(args.size)
    if args.threads:
        torch.set_num_threads(args.threads)

    def load(compile_mode: str | None) -> StreamEngine:
        engine = StreamEngine.load(
            args.model,
            weights=args.weights,
            device=args.device,
            random_weights=args.random_weights,
            base_only=args.allow_base_model,
            compat=args.compat,
            decoder=args.decoder,
            compile_mode=compile_mode,  # type: ignore[arg-type]
        )
        if args.random_weights and args.model != "tiny":
            # A random 5.7B text encoder would only cost memory and minutes: random prompt embeddings of that shape.
            engine.bundle.text = RandomPromptEmbeddings(engine.spec.text_len, engine.spec.text_dim)
        return engine

    engine = load(None)
    clip = moving_shapes(width, height, args.frames)
    run_stream(engine, clip[:16], steps=args.steps, stream_batch=True)  # warm-up: allocator, kernels
    compiled = None if args.no_compile else load(args.compile_mode)
    compile_s = None
    if compiled is not None:
        started = time.perf_counter()
        run_stream(compiled, clip[:16], steps=args.steps, stream_batch=True)  # the compilation of this shape
        compile_s = time.perf_counter() - started

    # The machines are noisy: every configuration runs --repeats times, interleaved, and medians are reported.
    runs: dict[str, list[dict]] = {"main": [], "batch2": [], "nobatch2": [], "compiled": []}
    baseline_runs: list[float] = []
    chunks = max(3, min(8, args.frames // 4))
    for _ in range(args.repeats):
        runs["main"].append(
            run_stream(engine, clip, steps=args.steps, stream_batch=True, log_iterations=args.log_iterations)
        )
        if compiled is not None:
            runs["compiled"].append(run_stream(compiled, clip, steps=args.steps, stream_batch=True))
        # Recompute baseline: the DiT recomputes its whole attention window every chunk (same weights, same run).
        baseline_runs.append(recompute_baseline_dit_ms(engine, width, height, args.steps, chunks))
        runs["batch2"].append(run_stream(engine, clip, steps=2, stream_batch=True))
        runs["nobatch2"].append(run_stream(engine, clip, steps=2, stream_batch=False))

    def med(name: str, key: str) -> float:
        return median([r[key] for r in runs[name]])

    ours = {k: median([r["stage_ms"][k] for r in runs["main"]]) for k in ("encode", "dit", "decode")}
    main_run = {"fps": med("main", "fps"), "ttff_s": med("main", "ttff_s"), "chunk_ms": med("main", "chunk_ms")}
    baseline_dit = median(baseline_runs)
    baseline_chunk_ms = ours["encode"] + baseline_dit + ours["decode"]
    recompute_ratio = baseline_chunk_ms / main_run["chunk_ms"]
    batch2 = {"fps": med("batch2", "fps")}
    nobatch2 = {"fps": med("nobatch2", "fps")}
    stream_batch_ratio = median([b["fps"] / n["fps"] for b, n in zip(runs["batch2"], runs["nobatch2"], strict=True)])

    compiled_fps = compiled_over_eager = compiled_stages = None
    if runs["compiled"]:
        compiled_fps = med("compiled", "fps")
        compiled_over_eager = median([c["fps"] / e["fps"] for c, e in zip(runs["compiled"], runs["main"], strict=True)])
        compiled_stages = {k: median([r["stage_ms"][k] for r in runs["compiled"]]) for k in ("encode", "dit", "decode")}

    host_syncs, syncs_by_kind = count_host_syncs(engine, clip, steps=args.steps)

    device = str(engine.device)
    if engine.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(engine.device)})"
    else:
        device += f" ({torch.get_num_threads()} threads)"
    result = {
        **stamp(),
        "model": args.model,
        "compat": args.compat,
        "decoder": args.decoder,
        "size": f"{width}x{height}",
        "steps": args.steps,
        "frames": args.frames,
        "repeats": args.repeats,
        "device": device,
        "fps": main_run["fps"],
        "ttff_s": main_run["ttff_s"],
        "stage_ms": ours,
        "chunk_ms": main_run["chunk_ms"],
        "recompute_baseline_dit_ms": baseline_dit,
        "recompute_ratio": recompute_ratio,
        "stream_batch_fps_2steps": batch2["fps"],
        "no_batch_fps_2steps": nobatch2["fps"],
        "stream_batch_ratio": stream_batch_ratio,
        "host_syncs_per_chunk": host_syncs,
        "host_syncs_by_kind": syncs_by_kind,
        "compile_mode": None if compiled is None else args.compile_mode,
        "compile_s": compile_s,
        "compiled_fps": compiled_fps,
        "compiled_over_eager": compiled_over_eager,
        "compiled_stage_ms": compiled_stages,
    }
    rows = [
        ("device", device),
        (f"fps ({args.steps} step)", result["fps"]),
        ("ttff_s", result["ttff_s"]),
        ("encode ms / chunk", ours["encode"]),
        ("dit ms / chunk", ours["dit"]),
        ("decode ms / chunk", ours["decode"]),
        ("recompute baseline dit ms / chunk", baseline_dit),
        ("recompute_ratio", recompute_ratio),
        ("fps 2 steps, stream batch", batch2["fps"]),
        ("fps 2 steps, no batch", nobatch2["fps"]),
        ("stream_batch_ratio", stream_batch_ratio),
        ("host_syncs_per_chunk", host_syncs),
        ("  by kind", ", ".join(f"{k} {v:g}" for k, v in syncs_by_kind.items())),
    ]
    if compiled_stages is not None:
        rows += [
            (f"compiled ({args.compile_mode}): warm-up s", compile_s),
            ("compiled_fps", compiled_fps),
            ("compiled_over_eager", compiled_over_eager),
            ("  compiled encode / dit / decode ms", " / ".join(f"{compiled_stages[k]:.1f}" for k in compiled_stages)),
        ]
    report(f"sdlive engine: {args.model} {width}x{height}", rows, result, args.json)
    return result


if __name__ == "__main__":
    main()
