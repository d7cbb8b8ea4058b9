"""`sdlive` commands: serve, status, preset, shutdown (the daemon and its control).

``serve`` hands its arguments to the daemon's own entry point (``sdlive.daemon.server.serve``, which imports torch)
only when it runs; the other commands talk to a running daemon through :mod:`sdlive.obs_bridge.client` and work on
a machine without torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from sdlive.daemon.protocol.constants import DEFAULT_CONTROL_ADDRESS

from ..client import DaemonClient, DaemonError

_Address = Annotated[
    str | None,
    typer.Option("--address", "-a", help=f"daemon control address (env SDLIVE_CONTROL; default {DEFAULT_CONTROL_ADDRESS})"),
]
_Token = Annotated[str | None, typer.Option("--token", help="auth token of a daemon bound off loopback (env SDLIVE_TOKEN)")]
_Timeout = Annotated[float, typer.Option("--timeout", help="seconds to wait for the daemon")]


def _address(address: str | None) -> str:
    return address or os.environ.get("SDLIVE_CONTROL") or DEFAULT_CONTROL_ADDRESS


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"sdlive: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


@contextlib.contextmanager
def _daemon(address: str | None, token: str | None, timeout_s: float) -> Iterator[DaemonClient]:
    """A client of the daemon the options name; a DaemonError (no daemon, a refusal) is ``sdlive: …``, exit 1."""
    try:
        with DaemonClient(_address(address), token=token, timeout_s=timeout_s) as client:
            yield client
    except DaemonError as exc:
        raise _fail(exc) from None


def serve(ctx: typer.Context) -> None:
    """Run the daemon: load the model, serve sessions over ZeroMQ + shared memory, show live stats.

    Every option comes from the daemon's config (``sdlive serve --help`` lists them): the arguments go through to
    ``sdlive.daemon.server.serve``, the one parser, generated from ``DaemonConfig``."""
    from sdlive.daemon.server.serve import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args)))


def status(
    address: _Address = None,
    token: _Token = None,
    session: Annotated[str | None, typer.Option("--session", "-s", help="one session only")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw status reply as JSON")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="refresh every second until Ctrl-C")] = False,
    timeout: _Timeout = 5.0,
) -> None:
    """Show the daemon's sessions and their live figures (fps, latency, drops)."""
    from rich.console import Console, Group

    from sdlive.daemon.server.ui import status_table

    # Piped into a file or another program, a terminal's 80-column default would cut every column to "…".
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        with _daemon(address, token, timeout) as client:
            if as_json:
                typer.echo(json.dumps(client.status(session).model_dump(mode="json", exclude={"ok", "id"}), indent=2))
                return

            def table() -> Group:
                return status_table(client.status(session))

            if not watch:
                console.print(table())
                return
            import time

            from rich.live import Live

            with Live(table(), console=console, refresh_per_second=2) as live:
                while True:
                    time.sleep(1.0)
                    live.update(table())
    except KeyboardInterrupt:
        return


def preset(
    name: Annotated[str | None, typer.Argument(help="preset to apply — omit to list the presets")] = None,
    session: Annotated[str | None, typer.Option("--session", "-s", help="session id (default: every open session)")] = None,
    address: _Address = None,
    token: _Token = None,
    timeout: _Timeout = 5.0,
) -> None:
    """Switch a session (or every session) to a preset, live; without NAME, list the presets."""
    with _daemon(address, token, timeout) as client:
        if name is None:
            listing = client.list_presets()
            for p in listing.presets:
                hotkey = f"  [{p.hotkey}]" if p.hotkey else ""
                index = "?" if p.index is None else p.index
                typer.echo(f"{index:>2}  {p.name:<16} steps={p.steps} noise={p.noise_scale}{hotkey}")
            for problem in listing.problems:
                typer.secho(f"skipped: {problem}", fg=typer.colors.YELLOW, err=True)
            return
        targets = [session] if session else [s.session_id for s in client.status().sessions]
        if not targets:
            raise _fail(RuntimeError("no open sessions to apply the preset to (pass --session ID once one is open)"))
        for session_id in targets:
            reply = client.set_preset(session_id, name)
            queued = " (queued; `sdlive status` shows it once live)" if reply.pending else ""
            typer.echo(f"session {session_id}: preset {name}{queued}")


def shutdown(
    address: _Address = None,
    token: _Token = None,
    timeout: _Timeout = 5.0,
) -> None:
    """Stop the daemon (sessions are closed, shared memory is freed)."""
    with _daemon(address, token, timeout) as client:
        client.shutdown()
    typer.echo("daemon stopping")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `sdlive` app."""
    app.command(
        "serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False
    )(serve)
    app.command("status")(status)
    app.command("preset")(preset)
    app.command("shutdown")(shutdown)
