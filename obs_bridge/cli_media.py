"""`sdlive` commands: cam, render, demo (capture → daemon → sinks)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `sdlive` app."""
