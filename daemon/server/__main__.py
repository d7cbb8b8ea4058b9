"""``python -m sdlive.daemon.server``: the daemon without the `sdlive` CLI (same flags as `sdlive serve`)."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, load_config
from .app import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdlive.daemon.server", description="Run the sdlive daemon.")
    parser.add_argument("--model")
    parser.add_argument("--weights")
    parser.add_argument("--device")
    parser.add_argument("--control", help="ROUTER endpoint, default tcp://127.0.0.1:5557")
    parser.add_argument("--pub", help="PUB endpoint, default tcp://127.0.0.1:5558")
    parser.add_argument("--token")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--max-sessions", type=int)
    parser.add_argument("--heartbeat-interval", type=float, dest="heartbeat_interval_s")
    parser.add_argument("--heartbeat-liveness", type=int)
    parser.add_argument("--preset-dir", action="append", dest="preset_dirs")
    parser.add_argument("--log-level")
    parser.add_argument("--log-file")
    parser.add_argument("--no-ui", action="store_const", const=False, dest="ui")
    parser.add_argument("--no-warmup", action="store_const", const=False, dest="warmup")
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config")
    try:
        config = load_config(config_file, **args)
    except ConfigError as exc:
        print(f"sdlive: {exc}", file=sys.stderr)
        return 2
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
