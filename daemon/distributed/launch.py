"""Starting the pipeline: rank 0 (the daemon) spawns the other ranks as processes of this module, or ``torchrun``
starts them all (its ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``), and every rank loads the model, joins
the process group and takes its blocks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ..engine.engine import StreamEngine
from .partition import even_split
from .pipeline import PipelineEngine, serve_worker
from .ring import RankFailure, init_ring
from .stage import StageEngine

__all__ = ["load_args", "load_multi_device", "rank_device", "run_rank", "start_pipeline", "torchrun_rank", "worker_main"]

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 1800.0
"""How long rank 0 waits for the other ranks to load the model and join (a 14B load from a slow disk included)."""


def rank_device(device: str | None, rank: int) -> torch.device:
    """Rank ``rank``'s device: the ``rank``-th GPU after the one named (``cuda`` → ``cuda:rank``), or the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base = torch.device(device)
    if base.type != "cuda":
        return base
    index = (base.index or 0) + rank
    if index >= torch.cuda.device_count():
        raise ValueError(f"rank {rank} needs GPU {index}, torch sees {torch.cuda.device_count()}: lower --gpus")
    return torch.device("cuda", index)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _load_stage(load: dict[str, Any], rank: int, world: int, cls: type[StreamEngine] = StageEngine) -> Any:
    """Rank ``rank``'s engine (a ``StageEngine`` of the pipeline; ``cls=StreamEngine``: a shard's)."""
    device = rank_device(load.get("device"), rank)
    if device.type == "cpu":  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = getattr(torch, load["dtype"]) if load.get("dtype") else None
    kwargs = {k: v for k, v in load.items() if k not in ("device", "dtype")}
    return cls.load(device=device, dtype=dtype, **kwargs)


def start_pipeline(
    load: dict[str, Any],
    world: int,
    *,
    address: str = "127.0.0.1",
    port: int | None = None,
    spawn: bool = True,
    rebalance: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> PipelineEngine:
    """Rank 0: start ranks 1…world-1 (``spawn``; else ``torchrun`` did), load the model, join them, and return
    the pipeline as one engine. ``load``: ``StreamEngine.load``'s arguments (``dtype`` by name), JSON-able."""
    if world < 2:
        raise ValueError(f"a pipeline needs at least 2 ranks, got {world}")
    port = port or _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    if spawn:
        for rank in range(1, world):
            cmd = [sys.executable, "-m", "sdlive.daemon.distributed.launch", "--rank", str(rank), "--world",
                   str(world), "--address", address, "--port", str(port), "--load", json.dumps(load)]  # fmt: skip
            procs.append(subprocess.Popen(cmd))

    def peer_gone() -> str | None:
        for rank, proc in enumerate(procs, start=1):
            code = proc.poll()
            if code is not None:
                return f"rank {rank} (pid {proc.pid}) exited with code {code}"
        return None

    def stop_workers() -> None:
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    try:
        if progress:
            progress(f"loading the model on rank 0 of {world}")
        stage = _load_stage(load, 0, world)
        if progress:
            progress(f"waiting for {world - 1} more rank(s) to load and join")
        joined: dict[str, Any] = {}

        def join() -> None:
            try:
                joined["ring"] = init_ring(0, world, stage.device, address=address, port=port)
            except Exception as exc:  # noqa: BLE001 - reported by the waiting thread
                joined["error"] = exc

        thread = threading.Thread(target=join, name="sdlive-pipeline-join", daemon=True)
        thread.start()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while thread.is_alive():
            thread.join(0.2)
            gone = peer_gone()
            if gone is not None:
                raise RankFailure(f"pipeline start failed: {gone} (its log above says why)")
            if time.monotonic() > deadline:
                raise RankFailure(f"pipeline start failed: the ranks did not join within {JOIN_TIMEOUT_S:.0f} s")
        if "error" in joined:
            raise RankFailure(f"pipeline start failed: {joined['error']}")
        ring = joined["ring"]
        ring.peer_gone = peer_gone
        stage.attach(ring, even_split(len(stage.transformer.blocks), world)[0])
        engine = PipelineEngine(stage, rebalance=rebalance, on_close=stop_workers)
        engine.workers = procs
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    log.info("pipeline of %d ranks ready: blocks %s", world, engine.describe())
    return engine


def load_args(config: Any) -> dict[str, Any]:
    """``StreamEngine.load``'s arguments from a ``DaemonConfig``, JSON-able (for the other ranks' command line)."""
    return {
        "model": config.model,
        "weights": str(config.weights) if config.weights else None,
        "device": config.device,
        "dtype": config.dtype,
        "cache_policy": config.cache_overrides() or None,
        "base_only": config.allow_base_model,
        "compat": config.compat,
        "decoder": config.decoder,
        "light_decoder": str(config.light_decoder) if config.light_decoder else None,
        "compile_mode": config.compile_mode if config.compile else None,
        "attention_backend": config.attention_backend,
        "quantize": config.quantize,
    }


def torchrun_rank() -> tuple[int, int] | None:
    """``(rank, world)`` when ``torchrun`` started this process as one of several ranks, else ``None``."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def load_multi_device(config: Any, progress: Callable[[str], None] | None = None) -> Any:
    """The daemon's engine for ``--gpus N``: a pipeline over N ranks (started here, or by ``torchrun``), or with
    ``--mode shard`` one engine per device in this process."""
    load = load_args(config)
    if config.mode == "shard":
        from .shard import ShardedEngine

        engines = [_load_stage(load, rank, 1, StreamEngine) for rank in range(config.gpus)]
        return ShardedEngine(list(engines))
    launched = torchrun_rank()
    if launched is not None:
        world = launched[1]
        if world != config.gpus:
            raise ValueError(f"torchrun started {world} ranks but --gpus is {config.gpus}: give the same number")
        return start_pipeline(load, world, address=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                              port=int(os.environ["MASTER_PORT"]), spawn=False, rebalance=config.rebalance,
                              progress=progress)  # fmt: skip
    return start_pipeline(load, config.gpus, rebalance=config.rebalance, progress=progress)


def run_rank(load: dict[str, Any], rank: int, world: int, *, address: str, port: int) -> int:
    """A rank other than 0: load, join, serve rank 0's commands; the exit code."""
    stage = _load_stage(load, rank, world)
    ring = init_ring(rank, world, stage.device, address=address, port=port)
    stage.attach(ring, even_split(len(stage.transformer.blocks), world)[rank])
    ring.gather(stage.layers)  # PipelineEngine's start: who runs which blocks
    try:
        code = serve_worker(stage)
    except RankFailure as exc:
        log.error("%s", exc)
        return 1
    # Leave the process group before the interpreter exits: its gloo threads, torn down by the exit instead, end
    # the process in std::terminate ("terminate called without an active exception", SIGABRT) now and then.
    ring.close()
    return code


def worker_main(argv: list[str] | None = None) -> int:
    """A rank other than 0 (``python -m sdlive.daemon.distributed.launch --rank R …``): load, join, serve."""
    parser = argparse.ArgumentParser(description=worker_main.__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--load", required=True, help="StreamEngine.load arguments, JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {args.rank} %(levelname)s %(name)s: %(message)s")
    _exit_with_parent()
    return run_rank(json.loads(args.load), args.rank, args.world, address=args.address, port=args.port)


def _exit_with_parent() -> None:
    """A rank started by the daemon ends when the daemon is gone, whatever state it is in (loading, waiting)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="sdlive-parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(worker_main())
