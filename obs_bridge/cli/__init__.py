"""The `sdlive` console script.

One typer app; each command group lives in its own module and adds itself through ``register(app)``. Nothing here
imports torch: commands that need the daemon side (``serve``, ``models pull``) import ``sdlive.daemon`` lazily.
"""

from __future__ import annotations

import typer

from . import daemon, media, models, obs

app = typer.Typer(
    name="sdlive",
    help="Real-time generative video for live streamers: a local GPU daemon, an OBS filter and a virtual webcam.",
    no_args_is_help=True,
    add_completion=False,
)

for _module in (daemon, models, obs, media):
    _module.register(app)


def main() -> None:
    """Entry point of the `sdlive` console script."""
    app()
