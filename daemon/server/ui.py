"""The live stats table `sdlive serve` shows in a terminal (rich). Off with ``--no-ui`` or when stdout is no TTY.

The same table renders ``sdlive status`` output, from a ``status`` reply.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..protocol.messages import SessionStats, StatusReply


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


LEGEND = (
    "fps in/set: frames arriving / the session's rate · lat: capture → restyled frame out, percentiles · "
    "drops in/out: inputs never restyled (daemon behind) / outputs the client never read · "
    "late: outputs released after their pacing deadline · "
    "sched drop/miss: inputs the deadline scheduler dropped (they could no longer meet their deadline) / inputs it "
    "ran after their deadline · mode: sb = stream batch, nb = no-batch (the lowest-latency mode, the SLO fallback), "
    "×N: N sessions share one DiT forward · step ms: one model step (one DiT forward) · "
    "via: shm = shared memory (same machine), net = network"
)
_IDENTITY = (
    ("session", "left"),
    ("client", "left"),
    ("size", "right"),
    ("preset", "left"),
    ("via", "left"),
    ("frames\nin/out", "right"),
)
_FIGURES = (
    ("fps\nin/set", "right"),
    ("out\nfps", "right"),
    ("lat ms\np50/95/99", "right"),
    ("jitter\nms", "right"),
    ("drops\nin/out", "right"),
    ("late", "right"),
    ("sched\ndrop/miss", "right"),
    ("mode", "left"),
    ("step\nms", "right"),
)


def _identity(s: SessionStats) -> list[str]:
    return [
        s.session_id,
        s.client or "–",
        f"{s.width}x{s.height}",
        s.preset or "–",
        s.transport,
        f"{s.frames_in}/{s.frames_out}",
    ]


def _mode(s: SessionStats) -> str:
    """``sb`` / ``nb`` (stream batch / no-batch), ``×N`` when N sessions shared its last forward; ``–``: unknown (an
    older daemon)."""
    mode = getattr(s, "mode", None)
    if mode is None:
        return "–"
    shared = getattr(s, "shared_forward", 0)
    return ("sb" if mode == "stream_batch" else "nb") + (f" ×{shared}" if shared > 1 else "")


def _figures(s: SessionStats) -> list[str]:
    return [
        f"{_fmt(s.fps_in)}/{_fmt(s.fps, '.0f')}",
        _fmt(s.fps_out),
        "/".join(_fmt(v, ".0f") for v in (s.latency_ms_p50, s.latency_ms_p95, s.latency_ms_p99)),
        _fmt(s.jitter_ms),
        f"{s.dropped_in}/{s.dropped_out}",
        str(s.deadline_misses),
        f"{s.dropped_late}/{s.late_in}",
        _mode(s),
        _fmt(s.step_ms),
    ]


def _table(columns: tuple[tuple[str, str], ...], rows: list[list[str]]) -> Table:
    table = Table(expand=False, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column, justify in columns:
        table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    return table


class _Sessions:
    """The per-session figures, laid out for the width they are drawn at: one table when it fits, else the sessions
    table and the figures table one above the other, so no column is cut to "…" (100 columns fit both)."""

    def __init__(self, sessions: list[SessionStats]) -> None:
        self.sessions = sessions

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        wide = _table(_IDENTITY + _FIGURES, [_identity(s) + _figures(s) for s in self.sessions])
        if Measurement.get(console, options.update(max_width=10_000), wide).maximum <= options.max_width:
            yield wide
        else:
            yield _table(_IDENTITY, [_identity(s) for s in self.sessions])
            yield _table((_IDENTITY[0],) + _FIGURES, [[s.session_id, *_figures(s)] for s in self.sessions])
        yield Text(LEGEND, style="dim")


def status_table(status: StatusReply) -> Group:
    """A header line, the sessions and their figures (one table when the terminal is wide enough, else two) and
    a legend, from a ``status`` reply."""
    memory = status.memory
    mem = memory.get("allocated_mb") if memory.get("allocated_mb") is not None else memory.get("rss_mb")
    head = Text.assemble(
        ("sdlive ", "bold"),
        f"{status.daemon_version} · model {status.model} on {status.device} · ",
        f"up {_fmt(status.uptime_s, '.0f')} s · ",
        f"{len(status.sessions)}/{status.max_sessions} sessions · ",
        f"memory {_fmt(mem, '.0f')} MB · control {status.control_address or '?'}",
        _cache_text(status),
        f"\n{status.parallel}" if getattr(status, "parallel", None) else "",
        f"\n{status.acceleration}" if getattr(status, "acceleration", None) else "",
    )
    loading = getattr(status, "loading", None)
    if getattr(status, "state", "ready") == "loading":
        what = (
            f"{loading.stage} ({loading.stages_done} steps done, {loading.elapsed_s:.0f} s)"
            if loading is not None
            else "…"
        )
        line = Text(
            f"loading {status.model}: {what}; sessions open once it is ready (`sdlive status --wait` follows it)",
            style="yellow",
        )
        return Group(head, line)
    if not status.sessions:
        return Group(head, Text("no sessions open: connect OBS, `sdlive cam`, or any client", style="dim"))
    return Group(head, _Sessions(status.sessions))


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
