"""OBS's configuration files: where they live, and the edits sdlive makes to them.

Stdlib only, so ``installer/install_obs.py`` can use it with any Python (it imports this file by path) and tests can
write a fresh OBS config directory for a headless OBS. What is edited, and why:

- ``global.ini`` ``[OBSWebSocket]``: where OBS 29 / obs-websocket 5.1 reads its settings.
- ``plugin_config/obs-websocket/config.json``: where OBS 30+ / obs-websocket 5.2+ reads them. Both are written.
- ``basic/scenes/<collection>.json`` ``modules.scripts-tool``: the scripts OBS loads at start (Tools → Scripts).

OBS rewrites these files when it exits: edit them while OBS is closed (``obs_running()`` tells).
"""

from __future__ import annotations

import configparser
import io
import json
import os
import shutil
import sys
from pathlib import Path

SCRIPT_FILE_NAME = "sdlive_obs.py"  # the name the installer gives obs_script.py in the scripts folder
RING_FILE_NAME = "sdlive_ring.py"  # ring.py copied next to it (the script loads it by path)
WEBSOCKET_SECTION = "OBSWebSocket"
DEFAULT_WS_PORT = 4455


def obs_config_dirs() -> list[Path]:
    """Candidate OBS config directories for this OS, most likely first (Flatpak and Snap included on Linux)."""
    home = Path.home()
    if sys.platform == "win32":
        appdata = os.environ.get("APPDATA") or str(home / "AppData" / "Roaming")
        return [Path(appdata) / "obs-studio"]
    if sys.platform == "darwin":
        return [home / "Library" / "Application Support" / "obs-studio"]
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    return [
        Path(xdg) / "obs-studio",
        home / ".var" / "app" / "com.obsproject.Studio" / "config" / "obs-studio",  # Flatpak
        home / "snap" / "obs-studio" / "current" / ".config" / "obs-studio",  # Snap
    ]


def find_obs_config_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The OBS config directory to edit: ``explicit`` if given, else the first candidate holding a global.ini."""
    if explicit:
        return Path(explicit)
    candidates = obs_config_dirs()
    for d in candidates:
        if (d / "global.ini").is_file():
            return d
    raise FileNotFoundError(
        "no OBS configuration found (looked for global.ini in "
        + ", ".join(str(d) for d in candidates)
        + "): start OBS once and close it, or pass --obs-config DIR"
    )


# ------------------------------------------------------------------------------------------------ ini files


def read_ini(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str  # OBS keys are case sensitive (FirstRun, ServerPort)
    if path.is_file():
        cp.read_string(path.read_text(encoding="utf-8-sig"))
    return cp


def write_ini(path: Path, cp: configparser.ConfigParser) -> None:
    buf = io.StringIO()
    for section in cp.sections():
        buf.write(f"[{section}]\n")
        for key, value in cp.items(section, raw=True):
            buf.write(f"{key}={value}\n")
        buf.write("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".sdlive-tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def websocket_settings(config_dir: Path) -> dict:
    """The websocket settings OBS will use: config.json (OBS 30+) if present, else global.ini (OBS 29)."""
    js = config_dir / "plugin_config" / "obs-websocket" / "config.json"
    if js.is_file():
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
            return {
                "enabled": bool(data.get("server_enabled")),
                "port": int(data.get("server_port", DEFAULT_WS_PORT)),
                "auth_required": bool(data.get("auth_required")),
                "password": data.get("server_password", ""),
                "source": str(js),
            }
        except (ValueError, TypeError):
            pass
    cp = read_ini(config_dir / "global.ini")
    if cp.has_section(WEBSOCKET_SECTION):
        sec = cp[WEBSOCKET_SECTION]
        return {
            "enabled": sec.get("ServerEnabled", "false").lower() == "true",
            "port": int(sec.get("ServerPort", DEFAULT_WS_PORT)),
            "auth_required": sec.get("AuthRequired", "false").lower() == "true",
            "password": sec.get("ServerPassword", ""),
            "source": str(config_dir / "global.ini"),
        }
    return {"enabled": False, "port": DEFAULT_WS_PORT, "auth_required": False, "password": "", "source": None}


def enable_websocket(config_dir: Path, *, port: int = DEFAULT_WS_PORT, password: str = "", dry_run: bool = False
                     ) -> list[str]:
    """Turn obs-websocket on in both places (OBS 29 reads global.ini, OBS 30+ config.json). Returns what changed."""
    actions = []
    ini_path = config_dir / "global.ini"
    cp = read_ini(ini_path)
    if not cp.has_section(WEBSOCKET_SECTION):
        cp.add_section(WEBSOCKET_SECTION)
    want = {
        "FirstLoad": "false",
        "ServerEnabled": "true",
        "ServerPort": str(port),
        "AlertsEnabled": "false",
        "AuthRequired": "true" if password else "false",
        "ServerPassword": password,
    }
    sec = cp[WEBSOCKET_SECTION]
    if any(sec.get(k) != v for k, v in want.items()):
        for k, v in want.items():
            sec[k] = v
        actions.append(f"websocket enabled on port {port} in {ini_path} [{WEBSOCKET_SECTION}] (OBS 29)")
        if not dry_run:
            write_ini(ini_path, cp)
    js_path = config_dir / "plugin_config" / "obs-websocket" / "config.json"
    data = {}
    if js_path.is_file():
        try:
            data = json.loads(js_path.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
    want_js = {
        "server_enabled": True,
        "server_port": port,
        "auth_required": bool(password),
        "server_password": password,
        "first_load": False,
        "alerts_enabled": False,
    }
    if any(data.get(k) != v for k, v in want_js.items()):
        data.update(want_js)
        actions.append(f"websocket enabled on port {port} in {js_path} (OBS 30+)")
        if not dry_run:
            js_path.parent.mkdir(parents=True, exist_ok=True)
            js_path.write_text(json.dumps(data, indent=4), encoding="utf-8")
    return actions


# --------------------------------------------------------------------------------------------- scene collections


def current_scene_collection(config_dir: Path) -> Path | None:
    """The scene collection file OBS opens at start (global.ini [Basic] SceneCollectionFile)."""
    cp = read_ini(config_dir / "global.ini")
    name = cp.get("Basic", "SceneCollectionFile", fallback=None)
    scenes = config_dir / "basic" / "scenes"
    if name and (scenes / f"{name}.json").is_file():
        return scenes / f"{name}.json"
    files = sorted(scenes.glob("*.json")) if scenes.is_dir() else []
    return files[0] if files else None


def scene_collections(config_dir: Path) -> list[Path]:
    scenes = config_dir / "basic" / "scenes"
    return sorted(p for p in scenes.glob("*.json")) if scenes.is_dir() else []


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))
    except OSError:
        return a == b


def add_script_to_collection(collection: Path, script_path: Path, *, dry_run: bool = False) -> str | None:
    """List the script in the collection's ``modules.scripts-tool`` (idempotent). Returns the action, or None."""
    data = json.loads(collection.read_text(encoding="utf-8-sig"))
    modules = data.setdefault("modules", {})
    scripts = modules.setdefault("scripts-tool", [])
    if any(_same_path(entry.get("path", ""), str(script_path)) for entry in scripts):
        return None
    scripts.append({"path": str(script_path), "settings": {}})
    if not dry_run:
        shutil.copy2(collection, collection.with_suffix(".json.sdlive-backup"))
        collection.write_text(json.dumps(data, indent=4), encoding="utf-8")
    return f"script {script_path} added to scene collection {collection.name} (Tools → Scripts loads it at start)"


def remove_script_from_collection(collection: Path, script_path: Path, *, dry_run: bool = False) -> str | None:
    data = json.loads(collection.read_text(encoding="utf-8-sig"))
    scripts = data.get("modules", {}).get("scripts-tool", [])
    kept = [e for e in scripts if not _same_path(e.get("path", ""), str(script_path))]
    if len(kept) == len(scripts):
        return None
    data["modules"]["scripts-tool"] = kept
    if not dry_run:
        collection.write_text(json.dumps(data, indent=4), encoding="utf-8")
    return f"script {script_path} removed from scene collection {collection.name}"


# ------------------------------------------------------------------------------------------------ OBS process


def obs_running() -> bool:
    """True when an OBS process runs for this user (edits to its config would be overwritten on exit)."""
    if sys.platform.startswith("linux"):
        uid = os.getuid()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid != uid:
                    continue
                with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
                    if fh.read().strip() == "obs":
                        return True
            except OSError:
                continue
        return False
    if sys.platform == "win32":
        import subprocess

        out = subprocess.run(["tasklist", "/FI", "IMAGENAME eq obs64.exe"], capture_output=True, text=True).stdout
        return "obs64.exe" in out
    import subprocess

    return subprocess.run(["pgrep", "-x", "OBS"], capture_output=True).returncode == 0


# ------------------------------------------------------------------------------------------ fresh config (tests)


def write_fresh_config(
    config_dir: Path,
    *,
    width: int = 320,
    height: int = 180,
    fps: int = 30,
    ws_port: int = DEFAULT_WS_PORT,
    ws_password: str = "",
    scripts: list[Path] | tuple[Path, ...] = (),
    script_settings: dict | None = None,
    name: str = "sdlive",
) -> Path:
    """A complete OBS config (no first-run wizard, websocket on, one empty scene "Main", the given scripts loaded
    at start) for a headless OBS. Returns the scene collection file."""
    config_dir.mkdir(parents=True, exist_ok=True)
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str
    cp["General"] = {
        "FirstRun": "true",
        "LastVersion": str((29 << 24) | (0 << 16) | 2),
        "InfoIncrement": "999",
        "ConfirmOnExit": "false",
        "EnableAutoUpdates": "false",
    }
    cp["Basic"] = {"Profile": name, "ProfileDir": name, "SceneCollection": name, "SceneCollectionFile": name}
    write_ini(config_dir / "global.ini", cp)
    enable_websocket(config_dir, port=ws_port, password=ws_password)
    profile = configparser.ConfigParser(interpolation=None)
    profile.optionxform = str
    profile["General"] = {"Name": name}
    profile["Video"] = {
        "BaseCX": str(width),
        "BaseCY": str(height),
        "OutputCX": str(width),
        "OutputCY": str(height),
        "FPSType": "0",
        "FPSCommon": str(fps),
    }
    profile["Output"] = {"Mode": "Simple"}
    write_ini(config_dir / "basic" / "profiles" / name / "basic.ini", profile)
    collection = config_dir / "basic" / "scenes" / f"{name}.json"
    collection.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "current_scene": "Main",
        "current_program_scene": "Main",
        "scene_order": [{"name": "Main"}],
        "sources": [{"id": "scene", "versioned_id": "scene", "name": "Main", "settings": {"items": [], "id_counter": 0}}],
        "modules": {
            "scripts-tool": [{"path": str(p), "settings": dict(script_settings or {})} for p in scripts],
        },
    }
    collection.write_text(json.dumps(doc, indent=4), encoding="utf-8")
    return collection
