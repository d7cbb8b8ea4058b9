"""The live stats table `sdlive serve` shows in a terminal (rich). Off with ``--no-ui`` or when stdout is no TTY.

The same table renders ``sdlive status`` output, from a ``status`` reply.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..protocol.messages import StatusReply


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _cache_text(status: StatusReply) -> str:
    """`` · KV cache 6 frames (3 sinks)`` from ``status.cache`` (empty when the daemon did not say)."""
    cache = status.cache
    if cache is None:
        return ""
    return f" · KV cache {cache.num_kv_cache} frames ({cache.num_sink} sinks)"


def status_table(status: StatusReply) -> Group:
    """A header line and one row per session, from a ``status`` reply."""
    memory = status.memory
    mem = memory.get("allocated_mb") if memory.get("allocated_mb") is not None else memory.get("rss_mb")
    head = Text.assemble(
        ("sdlive ", "bold"),
        f"{status.daemon_version} · model {status.model} on {status.device} · ",
        f"up {_fmt(status.uptime_s, '.0f')} s · ",
        f"{len(status.sessions)}/{status.max_sessions} sessions · ",
        f"memory {_fmt(mem, '.0f')} MB · control {status.control_address or '?'}",
        _cache_text(status),
    )
    if not status.sessions:
        return Group(head, Text("no sessions open: connect OBS, `sdlive cam`, or any client", style="dim"))
    table = Table(expand=False, header_style="bold")
    for column, justify in (
        ("session", "left"), ("client", "left"), ("size", "right"), ("preset", "left"), ("in fps", "right"),
        ("out fps", "right"), ("lat p50/p95/p99 ms", "right"), ("jitter ms", "right"), ("drops in/out", "right"),
        ("late", "right"), ("step ms", "right"), ("frames in/out", "right"), ("via", "left"),
    ):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for s in status.sessions:
        table.add_row(
            s.session_id,
            s.client or "–",
            f"{s.width}x{s.height}",
            s.preset or "–",
            f"{_fmt(s.fps_in)}/{_fmt(s.fps, '.0f')}",
            _fmt(s.fps_out),
            "/".join(_fmt(v, ".0f") for v in (s.latency_ms_p50, s.latency_ms_p95, s.latency_ms_p99)),
            _fmt(s.jitter_ms),
            f"{s.dropped_in}/{s.dropped_out}",
            str(s.deadline_misses),
            _fmt(s.step_ms),
            f"{s.frames_in}/{s.frames_out}",
            s.transport,
        )
    return Group(head, table)


class StatsView:
    """A rich ``Live`` display fed once a second by the daemon's compute loop."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._live = Live(Text("starting …"), console=self.console, refresh_per_second=2, transient=False)

    def update(self, status: StatusReply) -> None:
        self._live.update(status_table(status))

    def __enter__(self) -> StatsView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.__exit__(*exc)
