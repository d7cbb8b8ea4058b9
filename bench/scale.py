"""Scale benchmark: several sessions on one engine, with and without session batching, and a projection to GPUs.

    python bench/scale.py --json out/scale.json

``sessions``: for 1–4 sessions of one size on one engine (``tiny`` by default), throughput over all sessions and
the p99 latency of a frame (push → output ready), with and without session batching, measured side by side
(interleaved, ``--repeats`` times, medians) by ``sdlive.daemon.engine.scale.measure_sessions``.

``projection``: what the pipeline-parallel design (DESIGN "Multi-GPU") would give on 1–8 GPUs, from this run's
measured per-chunk stage times of one session (VAE encode, DiT, VAE decode; the DiT time split evenly over its
blocks). The model: rank 0 carries the encode, the last rank the decode, the blocks are split contiguously (at least one per
rank, so at most as many ranks as blocks) to minimise the slowest stage, each stage boundary costs one activation transfer (``tokens × dim × bytes`` over
``--link-gbps``), and with the stream batch at least as deep as the stages the pipeline emits one chunk per slowest
stage: ``fps = chunk_frames / max(stage)``. Latency grows with the stages (every chunk crosses all of them).

``ranks``: one session through the pipeline over 1–``--max-ranks`` ranks (1: the plain single-process engine; 2+:
``sdlive.daemon.distributed.launch.start_pipeline``, ranks as processes, gloo on the CPU, the blocks split evenly,
no rebalance), ``--rank-steps`` denoising steps so the stream batch is at least as deep as the stages, measured by
``measure_stream`` (``--repeats`` runs per rank count, medians). On one CPU the ranks share its cores (each rank
takes ``cores // ranks`` threads; the single process runs with all of them and, as a like-for-like baseline, with one
thread: two rows with ``n`` 1), so these figures show what the pipeline costs in
transfers and lockstep, not a speed-up: that needs a device per rank.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import moving_shapes, parse_size, report, stamp  # noqa: E402
from engine import run_stream  # noqa: E402  (bench/engine.py)

from sdlive.daemon.distributed.launch import start_pipeline  # noqa: E402
from sdlive.daemon.engine import StreamEngine  # noqa: E402
from sdlive.daemon.engine.scale import measure_sessions, measure_stream  # noqa: E402

CHUNK_FRAMES = 4


def measure_session_scaling(engine: StreamEngine, args: argparse.Namespace) -> list[dict]:
    """1..max sessions × batched/alone, interleaved per repeat; the median of each cell."""
    width, height = args.size
    runs: dict[tuple[int, bool], list[dict]] = {}
    for _ in range(args.repeats):
        for n in range(1, args.max_sessions + 1):
            for batched in (False, True):
                fig = measure_sessions(engine, n=n, batched=batched, width=width, height=height, steps=args.steps,
                                       frames=args.frames)  # fmt: skip
                runs.setdefault((n, batched), []).append(fig.as_dict())
    rows = []
    for (n, batched), figs in sorted(runs.items()):
        rows.append({
            "n": n,
            "batched": batched,
            "fps": round(statistics.median(f["fps"] for f in figs), 2),
            "p99_ms": round(statistics.median(f["p99_ms"] for f in figs), 1),
            "shared_forwards": figs[-1]["shared_forwards"],
            "forwards": figs[-1]["forwards"],
        })  # fmt: skip
    return rows


def measure_rank_scaling(args: argparse.Namespace) -> list[dict]:
    """1..max_ranks ranks: one engine start per rank count, ``repeats`` measured streams on it, the medians."""
    width, height = args.size
    threads = torch.get_num_threads()
    rows = []
    # (ranks, threads of the single process): the single process twice, with all cores and with one thread (what
    # each rank of a CPU pipeline gets), so each pipeline row has a like-for-like baseline in the same run
    runs = [(1, threads)] + ([(1, 1)] if threads > 1 else []) + [(w, 0) for w in range(2, args.max_ranks + 1)]
    for world, single_threads in runs:
        torch.set_num_threads(single_threads or threads)  # a pipeline's rank 0 (this process) takes cores // ranks
        if world == 1:
            engine = StreamEngine.load(args.model, device=args.device, random_weights=args.model != "tiny")
        else:
            load = {"model": args.model, "device": args.device, "random_weights": args.model != "tiny"}
            engine = start_pipeline(load, world, rebalance="off")
        try:
            figs = [measure_stream(engine, width=width, height=height, steps=args.rank_steps, frames=args.frames).as_dict()
                    for _ in range(args.repeats)]  # fmt: skip
            split = [len(r) for r in engine.ranges] if world > 1 else [engine.spec.transformer["num_layers"]]
        finally:
            close = getattr(engine, "close", None)
            if callable(close):
                close()
        rows.append({
            "n": world,
            "fps": round(statistics.median(f["fps"] for f in figs), 2),
            "p99_ms": round(statistics.median(f["p99_ms"] for f in figs), 1),
            "p50_ms": round(statistics.median(f["p50_ms"] for f in figs), 1),
            "split": split,
            "threads_per_rank": max(1, threads // world) if world > 1 else single_threads,
        })  # fmt: skip
    torch.set_num_threads(threads)
    return rows


def stage_times(engine: StreamEngine, args: argparse.Namespace) -> dict[str, float]:
    """Median per-chunk encode/DiT/decode ms of one session (the first chunk aside): ``bench/engine.py``'s run."""
    width, height = args.size
    clip = moving_shapes(width, height, 1 + CHUNK_FRAMES * 8)
    return run_stream(engine, clip, steps=args.steps, stream_batch=True)["stage_ms"]


def best_split(blocks: int, ranks: int, t_block: float, first_extra: float, last_extra: float) -> list[int]:
    """Contiguous block counts per rank (at least one each) minimising the slowest stage (rank 0 also encodes, the
    last decodes)."""
    best: tuple[float, list[int]] | None = None

    def extra(r: int) -> float:
        return (first_extra if r == 0 else 0.0) + (last_extra if r == ranks - 1 else 0.0)

    def search(r: int, left: int, split: list[int]) -> None:
        nonlocal best
        if r == ranks - 1:
            if left < 1:
                return
            full = [*split, left]
            worst = max(extra(i) + b * t_block for i, b in enumerate(full))
            if best is None or worst < best[0]:
                best = (worst, full)
            return
        for b in range(1, left - (ranks - r - 1) + 1):  # every rank holds at least one block
            search(r + 1, left - b, [*split, b])

    search(0, blocks, [])
    assert best is not None
    return best[1]


def project(stages: dict[str, float], blocks: int, transfer_ms: float, max_gpus: int) -> list[dict]:
    """The pipeline model of the module docstring for 1..max_gpus ranks."""
    t_block = stages["dit"] / blocks
    out = []
    for g in range(1, min(max_gpus, blocks) + 1):
        split = best_split(blocks, g, t_block, stages["encode"], stages["decode"])
        stage_ms = [
            (stages["encode"] if r == 0 else 0.0) + (stages["decode"] if r == g - 1 else 0.0) + b * t_block
            + (transfer_ms if r < g - 1 else 0.0)
            for r, b in enumerate(split)
        ]  # fmt: skip
        slowest = max(stage_ms)
        out.append({
            "gpus": g,
            "split": split,
            "fps": round(CHUNK_FRAMES * 1e3 / slowest, 2),
            "chunk_latency_ms": round(sum(stage_ms), 2),
        })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=parse_size, default=(64, 64), help="WxH (default 64x64)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=41, help="frames measured per session and run")
    parser.add_argument("--max-sessions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-ranks", type=int, default=3, help="ranks measured (on this machine's device type)")
    parser.add_argument("--rank-steps", type=int, default=3, help="steps of the rank runs (>= ranks)")
    parser.add_argument("--max-gpus", type=int, default=8)
    parser.add_argument("--link-gbps", type=float, default=25.0, help="GPU-to-GPU bandwidth for the projection")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    engine = StreamEngine.load(args.model, device=args.device, random_weights=args.model != "tiny")
    sessions = measure_session_scaling(engine, args)
    stages = stage_times(engine, args)
    spec = engine.spec
    width, height = args.size
    tokens = CHUNK_FRAMES // 4 * (height // 16) * (width // 16) * (args.steps if args.steps > 1 else 1)
    dim = spec.transformer["num_attention_heads"] * spec.transformer["attention_head_dim"]
    transfer_ms = tokens * dim * engine.dtype.itemsize / (args.link_gbps * 1e9) * 1e3
    blocks = spec.transformer["num_layers"]
    projection = project(stages, blocks, transfer_ms, args.max_gpus)
    if args.rank_steps < args.max_ranks:
        parser.error(f"--rank-steps {args.rank_steps} < --max-ranks {args.max_ranks}: the stream batch must be at least as deep as the stages")
    ranks = measure_rank_scaling(args)

    result = {
        **stamp(),
        "device": str(engine.device),
        "model": args.model,
        "size": f"{width}x{height}",
        "steps": args.steps,
        "sessions": sessions,
        "stage_ms": {k: round(v, 3) for k, v in stages.items()},
        "blocks": blocks,
        "transfer_ms": round(transfer_ms, 4),
        "projection": projection,
        "ranks": ranks,
        "rank_steps": args.rank_steps,
    }
    rows = [(f"sessions {r['n']} {'batched' if r['batched'] else 'alone'}: fps / p99 ms", f"{r['fps']} / {r['p99_ms']}")
            for r in sessions]  # fmt: skip
    rows += [(f"ranks {r['n']} {r['split']} ({r['threads_per_rank']} thread(s) each): fps / p99 ms", f"{r['fps']} / {r['p99_ms']}")
             for r in ranks]  # fmt: skip
    rows += [(f"projection {p['gpus']} GPU(s) {p['split']}: fps", p["fps"]) for p in projection]
    report(f"scale ({args.model}, {width}x{height}, {args.steps} steps, {engine.device})", rows, result, args.json)


if __name__ == "__main__":
    main()
