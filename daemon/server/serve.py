"""`sdlive serve` (also ``python -m sdlive.daemon.server``): the daemon process's one entry point.

Its flags are generated from :class:`~sdlive.daemon.config.DaemonConfig`'s fields, with the fields' docstrings as
help, so a new config field is a new flag with nothing else to edit. Binds first (so a busy port fails in a second,
not after a model load), then loads the model, then serves.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pydantic.fields import FieldInfo

from ..config import ConfigError, DaemonConfig, load_config
from ..presets import PresetLibrary, load_presets
from .loading import STAGE_WARMUP, LoadProgress
from .loop import ComputeLoop
from .transports import sweep_stale_rings

if TYPE_CHECKING:
    from rich.console import Console

    from ..engine import Engine, StreamEngine
    from .ui import StatsView

log = logging.getLogger(__name__)

PROG = "sdlive serve"


# ------------------------------------------------------------------------------------------------------- flags


def flag_name(field: str, info: FieldInfo) -> str:
    """``heartbeat_interval_s`` → ``--heartbeat-interval``, ``preset_dirs`` → ``--preset-dir``, a bool that
    defaults to True → ``--no-…``."""
    name = field.removesuffix("_s")
    if _is_list(info.annotation):
        name = name.removesuffix("s")
    name = name.replace("_", "-")
    if info.annotation is bool and info.default is True:
        return f"--no-{name}"
    return f"--{name}"


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _choices(annotation: Any) -> list[str] | None:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
        return [str(a) for a in typing.get_args(args[0])]
    return None


def build_parser() -> argparse.ArgumentParser:
    """The serve command line: ``--config FILE`` plus one flag per DaemonConfig field."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run the sdlive daemon: load the model, serve sessions over ZeroMQ + shared memory, show live "
        "stats. Precedence: flags > SDLIVE_* environment variables > the config file > defaults.",
    )
    parser.add_argument("--config", type=Path, help="TOML config file (default: the user config dir's config.toml)")
    for field, info in DaemonConfig.model_fields.items():
        flag = flag_name(field, info)
        help_text = (info.description or field.replace("_", " ")).replace("``", "").replace("%", "%%")
        if info.annotation is bool:
            if info.default is True:
                help_text = f"turn off (on by default): {help_text}"
                # the positive form too (--local-auth), so a script can say what it wants whatever the default
                parser.add_argument(flag.replace("--no-", "--", 1), dest=field, action="store_const", const=True,
                                    help=argparse.SUPPRESS)  # fmt: skip
            parser.add_argument(flag, dest=field, action="store_const", const=not info.default, help=help_text)
            continue
        default = info.get_default(call_default_factory=True)
        shown = f" (default: {default})" if default not in (None, [], "") else ""
        choices = _choices(info.annotation)
        parser.add_argument(
            flag,
            dest=field,
            action="append" if _is_list(info.annotation) else "store",
            choices=choices,
            metavar=None if choices else flag.removeprefix("--").replace("-", "_").upper(),
            help=help_text + shown,
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, build the config and serve; returns the process exit code (2: bad configuration)."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    try:
        config = load_config(config_file, **args)
    except ConfigError as exc:
        print(f"sdlive: {exc}", file=sys.stderr)
        return 2
    if config.gpus > 1 and int(os.environ.get("RANK", "0")) > 0:  # torchrun's other ranks serve rank 0's commands
        return serve_rank(config)
    return serve(config)


def serve_rank(config: DaemonConfig) -> int:
    """A pipeline rank other than 0 under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``)."""
    from ..distributed.launch import load_args, run_rank

    logging.basicConfig(level=config.log_level, format=f"%(asctime)s rank {os.environ['RANK']} %(levelname)s "
                        "%(name)s: %(message)s")  # fmt: skip
    if config.model == "auto":
        from ..model.probe import auto_model

        config = config.model_copy(update={"model": auto_model(config.device)[0]})
    return run_rank(load_args(config), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    address=os.environ.get("MASTER_ADDR", "127.0.0.1"), port=int(os.environ["MASTER_PORT"]))  # fmt: skip


# ------------------------------------------------------------------------------------------------------- serve


class _Interrupted(BaseException):
    """SIGTERM/SIGINT while the model loads (before the compute loop exists to receive a Shutdown)."""


EngineLoader = Callable[..., "Engine"]
"""``(config, view, progress=…) -> Engine``: :func:`load_engine`, or the relay's remote engine (``sdlive relay``)."""


def serve(
    config: DaemonConfig, *, engine_loader: EngineLoader | None = None, presets: PresetLibrary | None = None
) -> int:
    """Run the daemon until shutdown; returns the exit code. ``engine_loader`` replaces the model load (the relay
    serves a remote daemon's model); ``presets`` replaces the preset folders of ``config``."""
    from . import ui as ui_mod

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack: a stuck daemon explains itself
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    # The output thread must get the GIL back within ~1 ms of an output's due time while the compute thread runs
    # the engine's Python code between kernels (default switch interval: 5 ms, visible as output jitter).
    sys.setswitchinterval(0.001)
    view = ui_mod.StatsView() if config.ui and sys.stdout.isatty() else None
    setup_logging(config, console=view.console if view else None)
    if presets is None:
        presets = load_presets(config.preset_dirs, user=config.user_presets)
    for problem in presets.problems:
        log.warning("preset skipped: %s", problem)
    if not len(presets):
        log.warning("no presets found: sessions run with the engine's default prompt")
    stale = sweep_stale_rings()
    if stale:
        log.info("removed %d shared-memory ring(s) left by a daemon that is gone: %s", len(stale), ", ".join(stale))
    try:
        secret = config.secret()
    except OSError as exc:  # LocalSecretError names the path and the fix
        log.error("%s", exc)
        return 2
    if secret is not None:
        log.info("every socket is secured: %s", "CurveZMQ with keys from the token" if config.token else
                 "local auth, ZMTP PLAIN with your local secret (--no-local-auth turns it off)")  # fmt: skip
    else:
        log.warning("local auth is off (--no-local-auth): any account on this machine can drive this daemon")
    if config.model == "auto" and engine_loader is None:  # a relay's model is the remote daemon's
        from ..model.probe import auto_model

        name, why = auto_model(config.device)
        config = config.model_copy(update={"model": name})
        log.warning("model: %s (--model auto: %s)", name, why)
    loop = ComputeLoop(config, presets, secret=secret)
    try:
        loop.start()
    except (OSError, RuntimeError) as exc:
        log.error("%s", exc)
        loop.outbox.close()
        loop.ctx.term()
        return 2

    def _interrupt_load(signum: int, _frame: FrameType | None) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():  # a signal during the (long) load stops it at once
        signal.signal(signal.SIGTERM, _interrupt_load)
        signal.signal(signal.SIGINT, _interrupt_load)
        loop.interrupt_load = lambda: os.kill(os.getpid(), signal.SIGTERM)  # a `shutdown` request while loading
    try:
        engine = (engine_loader or load_engine)(config, view, progress=loop.loading)
    except _Interrupted as exc:
        log.info("interrupted by %s while loading the model", exc)
        loop.shutdown(f"signal {exc} during model load", dead=False)
        return 0
    except Exception as exc:  # noqa: BLE001 - reported as the dead sentinel, then exit
        log.error("cannot load model %r: %s", config.model, exc)
        loop.shutdown(f"model load failed: {exc}", dead=True)
        return 1
    loop.interrupt_load = None
    loop.install_signal_handlers()  # from here on a signal is a Shutdown on the compute loop's inbox
    loop.attach_engine(engine)
    log.info("sdlive daemon ready: model %s on %s, control %s", loop.model_name, loop.device, loop.io.bound_control)
    try:
        if view is not None:
            loop.on_stats = view.update
            with view:
                return loop.run()
        return loop.run()
    finally:
        close = getattr(engine, "close", None)  # a multi-device engine stops its other ranks
        if callable(close):
            close()


def setup_logging(config: DaemonConfig, *, console: Console | None = None) -> None:
    from rich.logging import RichHandler

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = []
    if console is not None:
        handlers.append(RichHandler(console=console, show_path=False, rich_tracebacks=False))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(fmt)
        handlers.append(handler)
    if config.log_file is not None:
        file_handler = logging.FileHandler(config.log_file)
        file_handler.setFormatter(fmt)
        handlers.append(file_handler)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(config.log_level)


def load_engine(config: DaemonConfig, view: StatsView | None, progress: LoadProgress | None = None) -> StreamEngine:
    """Load the model (with a spinner on the stats view), then warm it up unless ``--no-warmup``; ``progress``
    follows the loader's stages (``hello`` / ``status`` answer with them meanwhile)."""
    import contextlib

    import torch

    from ..engine import StreamEngine

    dtype = getattr(torch, config.dtype) if config.dtype is not None else None
    started = time.perf_counter()
    spinner = view.console.status(f"loading model {config.model} …") if view is not None else contextlib.nullcontext()
    with spinner:
        if config.gpus > 1:
            from ..distributed.launch import load_multi_device

            engine: Any = load_multi_device(config, progress=progress.update if progress is not None else None)
        else:
            engine = StreamEngine.load(
                config.model,
                weights=config.weights,
                device=config.device,
                dtype=dtype,
                cache_policy=config.cache_overrides(),
                base_only=config.allow_base_model,
                compat=config.compat,
                decoder=config.decoder,
                light_decoder=config.light_decoder,
                compile_mode=config.compile_mode if config.compile else None,
                attention_backend=config.attention_backend,
                quantize=config.quantize,
                progress=progress.update if progress is not None else None,
            )
    log.info("model %s loaded in %.1f s", config.model, time.perf_counter() - started)
    if config.warmup:
        if progress is not None:
            progress.update(STAGE_WARMUP)
        width, height = config.warmup_shape
        warm_up(engine, width=width, height=height)
    return engine


def warm_up(engine: StreamEngine, *, width: int = 64, height: int = 64, frames: int = 21) -> None:
    """Push a few chunks of noise through a throwaway session (first-call kernel setup, allocator growth; with
    ``--compile``, the compilation of this size's graphs)."""
    import numpy as np

    from ..protocol.params import GenerationParams

    started = time.perf_counter()
    try:
        session = engine.open_session(
            width=width, height=height, params=GenerationParams(prompt=(engine.prompt_vocabulary or ["warm-up"])[0]),
            pixel_format="bgr24",
        )
        rng = np.random.default_rng(0)
        for _ in range(frames):
            session.push(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        close = getattr(session, "close", None)  # a pipeline's ranks hold the session until told
        if callable(close):
            close()
    except Exception as exc:  # noqa: BLE001 - a failed warm-up only costs the first session some time
        log.warning("warm-up failed (the first session may start slowly): %s", exc)
        return
    log.info("warm-up (%dx%d) done in %.1f s", width, height, time.perf_counter() - started)

