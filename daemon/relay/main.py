"""`sdlive relay --daemon tcp://gpu-box:5557`: a local daemon whose model is a daemon on another PC.

OBS on the streaming PC talks to the relay exactly as to a local daemon (shared memory, the same control address by
default, presets, hotkeys, stats); the relay carries each session's frames to the GPU box's daemon as a network
session (JPEG both ways, authenticated with that daemon's token) and back. It is the daemon's own server
(``server.serve``) with :class:`~.remote.RemoteEngine` in place of a model, and the remote daemon's presets mirrored
into a folder of its own (refreshed every few seconds, so a preset edited on the GPU box shows up here too).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any

from ..config import ConfigError, DaemonConfig, load_config
from ..presets import Preset, PresetLibrary, load_presets
from ..protocol.constants import DEFAULT_CONTROL_ADDRESS, DEFAULT_PUB_ADDRESS
from ..protocol.messages import PresetInfo
from ..protocol.secret import local_secret_path
from .remote import DEFAULT_JPEG_QUALITY, RemoteEngine

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

PROG = "sdlive relay"
PRESET_SYNC_S = 5.0
"""How often the relay re-reads the remote daemon's presets."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Relay a remote sdlive daemon (the GPU box of a dual-PC setup) to this machine: OBS's sdlive "
        "filter, `sdlive cam` and every local client use it as a local daemon; frames travel to the remote daemon "
        "compressed and authenticated.",
    )
    parser.add_argument("--daemon", required=True, metavar="ADDRESS",
                        help="the remote daemon's control address, e.g. tcp://gpu-box:5557 (env SDLIVE_REMOTE)")  # fmt: skip
    parser.add_argument("--token", metavar="TOKEN",
                        help="the remote daemon's --token (env SDLIVE_REMOTE_TOKEN); needed off loopback")  # fmt: skip
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY, metavar="Q",
                        help=f"JPEG quality 1-100 of the frames both ways (default: {DEFAULT_JPEG_QUALITY})")  # fmt: skip
    parser.add_argument("--control", default=None, metavar="ADDRESS",
                        help=f"where local clients reach the relay (default: {DEFAULT_CONTROL_ADDRESS}, as a local "
                             "daemon, so the OBS filter needs no change)")  # fmt: skip
    parser.add_argument("--pub", default=None, metavar="ADDRESS", help=f"its stats PUB (default: {DEFAULT_PUB_ADDRESS})")
    parser.add_argument("--max-sessions", type=int, default=None, help="local sessions at most (default: 4)")
    parser.add_argument("--no-ui", dest="ui", action="store_false", default=None, help="no live stats table")
    parser.add_argument("--no-local-auth", dest="local_auth", action="store_false", default=None,
                        help="let any account of this machine use the relay (default: only clients holding your local "
                             "secret, as a local daemon; docs/security.md)")  # fmt: skip
    parser.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-file", type=Path, default=None)
    parser.add_argument("--preset-mirror", type=Path, default=None, metavar="DIR",
                        help="where the remote presets are mirrored (default: beside the local secret, in the "
                             "user's runtime dir)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, connect to the remote daemon and serve; returns the exit code (2: bad configuration,
    1: the remote daemon cannot be reached)."""
    from sdlive.obs_bridge.client import DaemonError, InvalidAddress, check_address

    from ..server.serve import serve

    args = build_parser().parse_args(argv)
    remote = args.daemon or os.environ.get("SDLIVE_REMOTE")
    token = args.token or os.environ.get("SDLIVE_REMOTE_TOKEN")
    try:
        remote = check_address(remote)
    except InvalidAddress as exc:
        print(f"sdlive relay: --daemon: {exc}", file=sys.stderr)
        return 2
    if not 1 <= args.jpeg_quality <= 100:
        print(f"sdlive relay: --jpeg-quality must be 1-100, got {args.jpeg_quality}", file=sys.stderr)
        return 2
    mirror = (args.preset_mirror or local_secret_path().parent / "relay-presets").expanduser()
    overrides: dict[str, Any] = {
        "model": f"remote daemon at {remote}",
        "control": args.control,
        "pub": args.pub,
        "max_sessions": args.max_sessions,
        "ui": args.ui,
        "local_auth": args.local_auth,
        "log_level": args.log_level,
        "log_file": args.log_file,
        "warmup": False,
        "user_presets": False,
        "preset_dirs": [mirror],
        "token": "",  # none for the relay's own loopback sockets (an SDLIVE_TOKEN meant for the remote stays there)
    }
    try:
        config = load_config(None, **overrides)
    except ConfigError as exc:
        print(f"sdlive relay: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    mirror.mkdir(parents=True, exist_ok=True, mode=0o700)
    presets = load_presets([mirror], shipped=False, user=False)

    def load_remote(config: DaemonConfig, view: Any, progress: Any = None) -> RemoteEngine:
        if progress is not None:
            progress.update(f"connecting to the remote daemon at {remote}")
        engine = RemoteEngine(remote, token=token, jpeg_quality=args.jpeg_quality)
        write_preset_mirror(mirror, engine.remote_presets)
        presets.refresh(min_interval_s=0)
        threading.Thread(target=_sync_presets, args=(engine, mirror, presets, stop), name="relay-presets",
                         daemon=True).start()  # fmt: skip
        log.info("relaying %s on %s (%s, %d presets)", remote, engine.device, engine.model_name,
                 len(engine.remote_presets))  # fmt: skip
        return engine

    try:
        return serve(config, engine_loader=load_remote, presets=presets)
    except DaemonError as exc:  # pragma: no cover - serve reports load failures itself
        print(f"sdlive relay: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.set()


# ------------------------------------------------------------------------------------------------ presets


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no TOML form here")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string (no \\/ is written)
    raise ValueError(f"cannot write {type(value).__name__} to a preset file")


def preset_file_text(preset: PresetInfo) -> str:
    """One preset as a preset file (the fields a preset file takes, ``docs/presets``), checked by reading it back."""
    fields = preset.model_dump(exclude_none=True, include=set(Preset.model_fields) - {"source"})
    text = "".join(f"{key} = {_toml_value(value)}\n" for key, value in fields.items())
    Preset.model_validate(tomllib.loads(text))  # what the relay's own preset loader will read
    return text


def write_preset_mirror(folder: Path, presets: list[PresetInfo]) -> int:
    """Make ``folder`` hold exactly ``presets`` as files (rewriting only what changed, so the daemon's preset
    refresh sees real changes only); returns how many files changed."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    wanted: dict[str, str] = {}
    for preset in presets:
        try:
            wanted[f"{preset.name}.toml"] = preset_file_text(preset)
        except ValueError as exc:
            log.warning("relay: remote preset %r cannot be mirrored: %s", preset.name, exc)
    changed = 0
    for path in folder.glob("*.toml"):
        if path.name not in wanted:
            path.unlink(missing_ok=True)
            changed += 1
    for name, text in wanted.items():
        path = folder / name
        try:
            if path.read_text(encoding="utf-8") == text:
                continue
        except OSError:
            pass
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        changed += 1
    return changed


def _sync_presets(engine: RemoteEngine, folder: Path, library: PresetLibrary, stop: threading.Event) -> None:
    from sdlive.obs_bridge.client import DaemonClient, DaemonError

    while not stop.wait(PRESET_SYNC_S):
        try:
            with DaemonClient(engine.address, token=engine.token, timeout_s=engine.timeout_s) as client:
                presets = client.list_presets().presets
        except DaemonError as exc:
            log.debug("relay: presets not refreshed: %s", exc)
            continue
        if write_preset_mirror(folder, presets):
            library.refresh(min_interval_s=0)
            log.info("relay: the remote daemon's presets changed; mirrored %d", len(presets))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
