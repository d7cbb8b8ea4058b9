"""`sdlive` commands: models list / models pull.

Both import ``sdlive.daemon.model`` (torch, diffusers) only when they run, so ``sdlive`` starts and its other
commands work on a client machine without torch.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console


def _out() -> Console:
    return Console(highlight=False)  # made per command: picks up the terminal (or COLUMNS) of this run


def _err() -> Console:
    return Console(stderr=True, highlight=False)


models_app = typer.Typer(
    name="models", help="Model weights: what is on disk, and downloading them.", no_args_is_help=True
)


def _fail(message: str) -> typer.Exit:
    _err().print(f"[bold red]error:[/] {message}")
    return typer.Exit(1)


def _daemon_side() -> None:
    try:
        import sdlive.daemon.model.bundle  # noqa: F401 - torch, diffusers, huggingface_hub
    except ImportError as exc:  # a client-only install: no torch / diffusers
        raise _fail(
            f"the model commands need the daemon side ({exc.name or exc} is missing): pip install 'sdlive[gpu]'"
        ) from None


def _size(nbytes: int) -> str:
    if nbytes <= 0:
        return "-"
    n = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@models_app.command("list")
def list_cmd() -> None:
    """The known models: downloaded or not, where, size on disk and estimated VRAM."""
    from rich.table import Table

    _daemon_side()
    from sdlive.daemon.model.sources import list_models

    out = _out()
    try:
        infos = list_models()
    except Exception as exc:  # noqa: BLE001 - a broken cache is reported, not a traceback
        raise _fail(f"could not list models: {exc}") from None
    table = Table(title="sdlive models", title_justify="left")
    table.add_column("model", style="bold")
    table.add_column("on disk")
    table.add_column("size", justify="right")
    table.add_column("VRAM (est.)", justify="right")
    table.add_column("where / missing", overflow="fold")
    for info in infos:
        state = "[green]yes[/]" if info.downloaded else "[yellow]no[/]"
        where = info.location if info.downloaded else "missing: " + ", ".join(info.missing)
        if info.name == "tiny":
            state = "[green]built in[/]"
        vram = f"{info.estimated_vram_gb:g} GB" if info.estimated_vram_gb else "-"
        table.add_row(info.name, state, _size(info.size_bytes), vram, where)
    out.print(table)
    if not all(i.downloaded for i in infos):
        missing = next(i.name for i in infos if not i.downloaded)
        out.print(f"[dim]download with: sdlive models pull {missing}[/]")


@models_app.command("pull")
def pull_cmd(
    name: Annotated[str, typer.Argument(help="model name: wan2.1-1.3b or wan2.1-14b (tiny needs no download)")],
) -> None:
    """Download a model's weights into the Hugging Face cache (resumable; nothing runs without them)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    _daemon_side()
    from sdlive.daemon.model.configs import MODEL_NAMES, get_model_spec
    from sdlive.daemon.model.errors import CheckpointError
    from sdlive.daemon.model.hub import pull_model

    out = _out()

    try:
        spec = get_model_spec(name)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if spec.random_weights:
        out.print(f"{name} is built from a fixed seed: nothing to download ({', '.join(MODEL_NAMES)})")
        return

    columns = (
        TextColumn("[bold]{task.description}", justify="left"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_err(), transient=False) as bar:
        tasks: dict[tuple[str, str], TaskID] = {}

        def on_progress(event) -> None:
            key = (event.repo, event.file)
            label = f"{event.repo.split('/')[-1]} {event.file}".strip()
            if key not in tasks:
                tasks[key] = bar.add_task(label, total=event.total or None)
            bar.update(tasks[key], completed=event.done, total=event.total or None)

        try:
            paths = pull_model(name, progress=on_progress)
        except CheckpointError as exc:
            raise _fail(str(exc)) from None
    for path in paths:
        out.print(f"[green]✓[/] {path}")
    out.print(f"{name} is ready: sdlive serve --model {name}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `sdlive` app."""
    app.add_typer(models_app, name="models")
