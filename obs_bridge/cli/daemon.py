"""`sdlive` commands: serve, status, preset, prompt, shutdown (the daemon and its control).

``serve`` hands its arguments to the daemon's own entry point (``sdlive.daemon.server.serve``, which imports torch)
only when it runs; the other commands talk to a running daemon through :mod:`sdlive.obs_bridge.client` and work on
a machine without torch.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from sdlive.daemon.protocol.constants import DEFAULT_CONTROL_ADDRESS, PROMPT_MAX_CHARS

from ..client import DaemonClient, DaemonError, DaemonUnavailable
from .connect import TargetError, resolve_target

_Address = Annotated[
    str | None,
    typer.Option("--address", "-a", help=f"daemon control address (env SDLIVE_CONTROL, config.toml `control`; "
                                         f"default {DEFAULT_CONTROL_ADDRESS})"),
]
_Token = Annotated[str | None, typer.Option("--token", help="auth token of a daemon bound off loopback (env SDLIVE_TOKEN)")]
_Timeout = Annotated[float, typer.Option("--timeout", min=0.1, help="seconds to wait for the daemon")]
_Session = Annotated[str | None, typer.Option("--session", "-s", help="session id (default: every open session)")]


def _fail(message: object) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


def _message(exc: DaemonError) -> str:
    return exc.message if isinstance(exc, DaemonUnavailable) else str(exc)


@contextlib.contextmanager
def _daemon(address: str | None, token: str | None, timeout_s: float) -> Iterator[DaemonClient]:
    """A client of the daemon the options (or env, or config.toml) name; a bad address, no daemon or a refusal is
    one ``error: …`` line and exit 1."""
    try:
        target = resolve_target(address, token)
        with DaemonClient(target.control, token=target.token, timeout_s=timeout_s) as client:
            yield client
    except TargetError as exc:
        raise _fail(exc) from None
    except DaemonError as exc:
        raise _fail(_message(exc)) from None


def _sessions(client: DaemonClient, session: str | None) -> list[str]:
    targets = [session] if session else [s.session_id for s in client.status().sessions]
    if not targets:
        raise _fail("no open sessions to change (pass --session ID once one is open; `sdlive status` lists them)")
    return targets


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
    wait: Annotated[bool, typer.Option("--wait", help="a daemon still loading its model: show its progress until "
                                                      "it is ready")] = False,
    timeout: _Timeout = 5.0,
) -> None:
    """Show the daemon's sessions and their live figures (fps, latency, drops).

    A daemon that is still loading its model says so, with its progress (`--wait` follows it until it is ready)."""
    from rich.console import Console, Group

    from sdlive.daemon.server.ui import status_table

    # Piped into a file or another program, a terminal's 80-column default would cut every column to "…".
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        with _daemon(address, token, timeout) as client:
            if wait:
                _wait_loaded(client)
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


def _wait_loaded(client: DaemonClient) -> None:
    """Follow a loading daemon's progress (a spinner line) until it is ready; exit 1 if it stops answering."""
    from rich.console import Console

    from .autostart import DAEMON_START_TIMEOUT_S, loading_line

    hello = client.hello()
    if getattr(hello, "state", "ready") == "ready":
        return
    with Console(stderr=True).status(loading_line(client.address, hello)) as spinner:
        try:
            client.wait_ready(DAEMON_START_TIMEOUT_S * 10,
                              on_loading=lambda h: spinner.update(loading_line(client.address, h)))
        except DaemonError as exc:
            raise _fail(_message(exc)) from None


def preset(
    name: Annotated[str | None, typer.Argument(help="preset to apply (a name or its number) — omit to list them")] = None,
    session: _Session = None,
    address: _Address = None,
    token: _Token = None,
    timeout: _Timeout = 5.0,
) -> None:
    """Switch a session (or every session) to a preset, live; without NAME, list the presets.

    Presets are numbered the same everywhere: a preset's number is the digit of its hotkey (ctrl+shift+3 is 3),
    the others follow in name order; `sdlive cam`'s number keys use the same numbers."""
    from ..media.pump import preset_numbers

    with _daemon(address, token, timeout) as client:
        listing = client.list_presets()
        numbers = preset_numbers((p.name, p.hotkey) for p in listing.presets)
        if name is None:
            for p in sorted(listing.presets, key=lambda p: numbers[p.name]):
                hotkey = f"  [{p.hotkey}]" if p.hotkey else ""
                typer.echo(f"{numbers[p.name]:>2}  {p.name:<16} steps={p.steps} noise={p.noise_scale}{hotkey}")
            for problem in listing.problems:
                typer.secho(f"skipped: {problem}", fg=typer.colors.YELLOW, err=True)
            return
        by_number = {str(n): p for p, n in numbers.items()}
        chosen = by_number.get(name, name)  # an unknown name: the daemon's answer names the known ones
        for session_id in _sessions(client, session):
            try:
                reply = client.set_preset(session_id, chosen)
            except DaemonError as exc:
                raise _fail(_message(exc)) from None
            queued = " (queued; `sdlive status` shows it once live)" if reply.pending else ""
            typer.echo(f"session {session_id}: preset {chosen}{queued}")


def prompt(
    text: Annotated[str, typer.Argument(help="the prompt to restyle with, e.g. \"a watercolor painting, soft light\"")],
    session: _Session = None,
    address: _Address = None,
    token: _Token = None,
    timeout: _Timeout = 5.0,
) -> None:
    """Type a prompt into a live session (or every session): blended in like a preset switch, no restart."""
    text = text.strip()
    if not text:
        raise _fail('the prompt is empty: sdlive prompt "a watercolor painting"')
    if len(text) > PROMPT_MAX_CHARS:
        raise _fail(f"the prompt has {len(text)} characters, at most {PROMPT_MAX_CHARS} fit")
    with _daemon(address, token, timeout) as client:
        for session_id in _sessions(client, session):
            try:
                reply = client.set_params(session_id, prompt=text)
            except DaemonError as exc:
                raise _fail(_message(exc)) from None
            queued = " (queued; blended in over the next chunks)" if reply.pending else ""
            typer.echo(f"session {session_id}: prompt set{queued}")


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
    app.command("prompt")(prompt)
    app.command("shutdown")(shutdown)
