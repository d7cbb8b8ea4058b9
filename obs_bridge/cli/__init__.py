"""The `sdlive` console script.

One typer app; each command group lives in its own module and adds itself through ``register(app)``. Nothing here
imports torch: commands that need the daemon side (``serve``, ``models pull``) import ``sdlive.daemon`` lazily.
"""

from __future__ import annotations

from typing import Annotated

import typer

from . import daemon, media, models, obs, relay

app = typer.Typer(
    name="sdlive",
    help="Real-time generative video for live streamers: a local GPU daemon, an OBS filter and a virtual webcam.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal instead of keeping their line breaks
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdlive")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        from sdlive.daemon.protocol.constants import PROTOCOL_VERSION

        typer.echo(f"sdlive {_version()} (protocol {PROTOCOL_VERSION})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", is_eager=True, callback=_show_version,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Real-time generative video for live streamers: a local GPU daemon, an OBS filter and a virtual webcam."""

for _module in (daemon, models, obs, media, relay):
    _module.register(app)


def main() -> None:
    """Entry point of the `sdlive` console script."""
    app()
