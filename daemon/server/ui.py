"""The live stats table `sdlive serve` shows in a terminal (rich). Off with ``--no-ui`` or when stdout is no TTY.

The same table renders ``sdlive status`` output, from a ``status`` reply.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def status_table(status: dict[str, Any]) -> Group:
    """A header line and one row per session, from a ``status`` reply body."""
    memory = status.get("memory") or {}
    mem = memory.get("allocated_mb") if memory.get("allocated_mb") is not None else memory.get("rss_mb")
    head = Text.assemble(
        ("sdlive ", "bold"),
        f"{status.get('daemon_version', '?')} · model {status.get('model', '?')} on {status.get('device', '?')} · ",
        f"up {_fmt(status.get('uptime_s'), '.0f')} s · ",
        f"{len(status.get('sessions') or [])}/{status.get('max_sessions', '?')} sessions · ",
        f"memory {_fmt(mem, '.0f')} MB · control {status.get('control_address', '?')}",
    )
    table = Table(expand=False, header_style="bold")
    for column, justify in (
        ("session", "left"), ("client", "left"), ("size", "right"), ("preset", "left"), ("in fps", "right"),
        ("out fps", "right"), ("lat p50/p95/p99 ms", "right"), ("jitter ms", "right"), ("drops in/out", "right"),
        ("late", "right"), ("step ms", "right"), ("frames in/out", "right"), ("via", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for s in status.get("sessions") or []:
        table.add_row(
            str(s.get("session_id")),
            str(s.get("client") or "–"),
            f"{s.get('width')}x{s.get('height')}",
            str(s.get("preset") or "–"),
            f"{_fmt(s.get('fps_in'))}/{_fmt(s.get('fps'), '.0f')}",
            _fmt(s.get("fps_out")),
            "/".join(_fmt(s.get(k), ".0f") for k in ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99")),
            _fmt(s.get("jitter_ms")),
            f"{s.get('dropped_in', 0)}/{s.get('dropped_out', 0)}",
            str(s.get("deadline_misses", 0)),
            _fmt(s.get("step_ms")),
            f"{s.get('frames_in', 0)}/{s.get('frames_out', 0)}",
            str(s.get("transport", "?")),
        )
    if not status.get("sessions"):
        return Group(head, Text("no sessions open: connect OBS, `sdlive cam`, or any client", style="dim"))
    return Group(head, table)


class StatsView:
    """A rich ``Live`` display fed once a second by the daemon's compute loop."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._live = Live(Text("starting …"), console=self.console, refresh_per_second=2, transient=False)

    def update(self, status: dict[str, Any]) -> None:
        self._live.update(status_table(status))

    def __enter__(self) -> StatsView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.__exit__(*exc)
