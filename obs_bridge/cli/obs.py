"""`sdlive obs …`: set OBS up and drive it through obs-websocket v5 (OBS must be running with its websocket on).

- ``sdlive obs install``   put the OBS script where OBS loads it (runs ``installer/install_obs.py``; OBS closed)
- ``sdlive obs setup``     check OBS / websocket versions and that the script runs, add the sdlive filter to a source
- ``sdlive obs preset X``  switch preset live (presses the script's hotkey: ``TriggerHotkeyByName``); X = name|next|prev
- ``sdlive obs status``    versions, script loaded, every sdlive filter and its settings
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer

from sdlive.daemon.protocol.constants import DEFAULT_CONTROL_ADDRESS

from .. import obs_setup

obs_app = typer.Typer(name="obs", help="Set up and drive OBS (obs-websocket v5).", no_args_is_help=True)

_Host = Annotated[str, typer.Option("--host", help="OBS websocket host (env SDLIVE_OBS_HOST)")]
_Port = Annotated[
    int | None,
    typer.Option("--port", help="OBS websocket port (env SDLIVE_OBS_PORT; default: the one in this user's OBS "
                                "config, else 4455)"),
]
_Password = Annotated[
    str | None,
    typer.Option("--password", help="OBS websocket password (env SDLIVE_OBS_PASSWORD; default: the one in this "
                                    "user's OBS config, for OBS on this machine)"),
]
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_Json = Annotated[bool, typer.Option("--json", help="print a JSON report instead of text")]


def _local_obs_websocket() -> dict | None:
    """The websocket settings in this user's OBS config (where `sdlive obs install --websocket` keeps them)."""
    try:
        return obs_setup.websocket_settings(obs_setup.find_obs_config_dir())
    except (OSError, ValueError):
        return None


def _conn(host: str, port: int | None, password: str | None) -> Any:  # an obsws-python ReqClient (untyped library)
    """Connect to OBS: flags, then SDLIVE_OBS_* variables, then (OBS on this machine) OBS's own config."""
    from .. import obsws_tools

    host = os.environ.get("SDLIVE_OBS_HOST", host) if host == "localhost" else host
    if port is None and os.environ.get("SDLIVE_OBS_PORT"):
        port = int(os.environ["SDLIVE_OBS_PORT"])
    if password is None:
        password = os.environ.get("SDLIVE_OBS_PASSWORD")
    hint = ""
    if host in LOCAL_HOSTS and (port is None or password is None):
        local = _local_obs_websocket()
        if local is not None and local["source"]:
            port = port if port is not None else local["port"]
            if password is None and local["auth_required"]:
                password, hint = local["password"], f" (the password tried is the one in {local['source']})"
    try:
        return obsws_tools.connect(host, port or obs_setup.DEFAULT_WS_PORT, password or "", hint=hint)
    except obsws_tools.ObsUnavailable as exc:
        raise _fail(exc) from None


def _fail(exc: Exception | str) -> typer.Exit:
    typer.secho(f"sdlive: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


def _emit(report: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for line in lines:
            typer.echo(line)


SCRIPT_MISSING_HELP = (
    "the sdlive script is not loaded in OBS. Close OBS and run `sdlive obs install` (or add it by hand: "
    "Tools → Scripts → + → {script}), then start OBS again"
)


@obs_app.command("setup")
def setup(
    source: Annotated[str | None, typer.Option("--source", "-s", help="source to add the filter to")] = None,
    daemon: Annotated[
        str, typer.Option("--daemon", help="daemon control address the filter connects to")
    ] = DEFAULT_CONTROL_ADDRESS,
    preset: Annotated[str | None, typer.Option("--preset", help="preset the filter starts with")] = None,
    filter_name: Annotated[str, typer.Option("--filter-name", help="name of the filter in OBS")] = "sdlive",
    host: _Host = "localhost",
    port: _Port = None,
    password: _Password = None,
    as_json: _Json = False,
) -> None:
    """Check OBS and obs-websocket, check the sdlive script runs in OBS, add the sdlive filter to --source."""
    from .. import obsws_tools

    client = _conn(host, port, password)
    report: dict = {"actions": []}
    lines = []
    try:
        versions = obsws_tools.check_versions(client)
        report["versions"] = versions
        lines.append(f"OBS {versions['obs_version']}, obs-websocket {versions['websocket_version']}")
        if versions["problems"]:
            raise _fail("; ".join(versions["problems"]))
        if not obsws_tools.script_loaded(client):
            raise _fail(SCRIPT_MISSING_HELP.format(script=_script_path()))
        report["script_loaded"] = True
        lines.append("sdlive script: loaded (preset hotkeys registered)")
        sources = obsws_tools.input_names(client)
        if source is None:
            report["sources"] = sources
            raise _fail("pass --source NAME to choose the source to restyle; OBS has: " + (", ".join(sources) or "none"))
        settings = {obsws_tools.SETTING_ADDRESS: daemon}
        if preset:
            settings[obsws_tools.SETTING_PRESET] = preset
        try:
            action = obsws_tools.add_filter(client, source, name=filter_name, settings=settings)
        except ValueError as exc:
            raise _fail(exc) from None
        report["actions"].append(action)
        lines.append(action)
        lines.append(f"the filter connects to {daemon}; start the daemon with `sdlive serve` if it is not running")
    finally:
        _disconnect(client)
    _emit(report, as_json, lines)


def _script_path() -> str:
    return str(obs_setup.SCRIPT_SOURCE_DIR / obs_setup.SCRIPT_NAMES.ENTRY_FILE)


def _disconnect(client: Any) -> None:
    try:
        client.disconnect()
    except Exception:  # noqa: BLE001
        pass


@obs_app.command("preset")
def preset(
    name: Annotated[str, typer.Argument(help="preset name, or next / prev")],
    host: _Host = "localhost",
    port: _Port = None,
    password: _Password = None,
) -> None:
    """Switch every sdlive filter in OBS to a preset (presses the script's hotkey through obs-websocket)."""
    from .. import obsws_tools

    client = _conn(host, port, password)
    try:
        hotkey = obsws_tools.trigger_preset(client, name)
    except ValueError as exc:
        raise _fail(exc) from None
    finally:
        _disconnect(client)
    typer.echo(f"pressed {hotkey}")


@obs_app.command("status")
def status(
    host: _Host = "localhost",
    port: _Port = None,
    password: _Password = None,
    as_json: _Json = False,
) -> None:
    """OBS and websocket versions, whether the sdlive script runs, and every sdlive filter with its settings."""
    from .. import obsws_tools

    client = _conn(host, port, password)
    try:
        versions = obsws_tools.check_versions(client)
        loaded = obsws_tools.script_loaded(client)
        presets = obsws_tools.preset_names(client)
        filters = obsws_tools.sdlive_filters(client)
    finally:
        _disconnect(client)
    report = {"versions": versions, "script_loaded": loaded, "presets": presets, "filters": filters}
    lines = [
        f"OBS {versions['obs_version']}, obs-websocket {versions['websocket_version']}",
        "sdlive script: " + ("loaded" if loaded else "NOT loaded: " + SCRIPT_MISSING_HELP.format(script=_script_path())),
    ]
    if loaded:
        lines.append("preset hotkeys: " + (", ".join(presets) or "none yet") + "; and next / prev")
    if not filters:
        lines.append("no sdlive filter yet: `sdlive obs setup --source NAME`")
    for f in filters:
        s = f["settings"]
        lines.append(
            f"filter {f['filter']!r} on {f['source']!r} ({'enabled' if f['enabled'] else 'disabled'}): "
            f"daemon {s.get(obsws_tools.SETTING_ADDRESS, DEFAULT_CONTROL_ADDRESS)}, "
            f"preset {s.get(obsws_tools.SETTING_PRESET) or '(daemon default)'}"
        )
    _emit(report, as_json, lines)


@obs_app.command("install", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def install(ctx: typer.Context) -> None:
    """Install the OBS script into OBS (same as installer/install_obs.py; pass its options, e.g. --dry-run)."""
    raise typer.Exit(obs_setup.install_main(list(ctx.args)))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `sdlive` app."""
    app.add_typer(obs_app, name="obs")
