"""`sdlive relay`: OBS on this PC, the model on another (``sdlive.daemon.relay``, imported when it runs)."""

from __future__ import annotations

import typer


def relay(ctx: typer.Context) -> None:
    """Relay a remote daemon (the GPU box of a dual-PC setup) to this PC: OBS's filter and every local client use
    it as a local daemon. `sdlive relay --help` lists the options, e.g. `sdlive relay --daemon tcp://gpu-box:5557
    --token SECRET`."""
    from sdlive.daemon.relay.main import main as relay_main

    raise typer.Exit(relay_main(list(ctx.args)))


def register(app: typer.Typer) -> None:
    app.command(
        "relay", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False
    )(relay)
