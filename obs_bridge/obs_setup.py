"""OBS's configuration files: where they live, the edits sdlive makes to them, and the installer.

Stdlib only, so ``installer/install_obs.py`` can use it with any Python (it imports this file by path). What is
edited, and why:

- ``global.ini`` ``[OBSWebSocket]``: where OBS 29 / obs-websocket 5.1 reads its settings.
- ``plugin_config/obs-websocket/config.json``: where OBS 30+ / obs-websocket 5.2+ reads them. Both are written,
  never weaker than they were (see the obs-websocket section), and restored by the uninstall.
- ``basic/scenes/<collection>.json`` ``modules.scripts-tool``: the scripts OBS loads at start (Tools → Scripts).

OBS rewrites these files when it exits: edit them while OBS is closed (``obs_running()`` tells).
"""

from __future__ import annotations

import configparser
import importlib.util
import io
import json
import os
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

WEBSOCKET_SECTION = "OBSWebSocket"
DEFAULT_WS_PORT = 4455
SCRIPT_SOURCE_DIR = Path(__file__).resolve().parent / "obs_script"  # the OBS script's files (obs_bridge/obs_script)


def _load_script_names() -> types.ModuleType:
    """``obs_script/sdlive_names.py``, the names the script gives things in OBS, loaded by path: the script folder
    is not a package (OBS imports its files as top-level modules)."""
    spec = importlib.util.spec_from_file_location("_sdlive_obs_script_names", SCRIPT_SOURCE_DIR / "sdlive_names.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT_NAMES = _load_script_names()


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
        d = Path(explicit)
        if not (d / "global.ini").is_file():
            raise FileNotFoundError(
                f"{d} is not an OBS config directory (no global.ini): start OBS once and close it, or pass the folder "
                "that holds global.ini (Linux ~/.config/obs-studio, Windows %APPDATA%\\obs-studio, macOS "
                "~/Library/Application Support/obs-studio)"
            )
        return d
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


class IniFile(configparser.ConfigParser):
    """An OBS ini file: keys keep their case (FirstRun, ServerPort), no interpolation, repeated keys tolerated."""

    def __init__(self) -> None:
        super().__init__(interpolation=None, strict=False)

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def read_ini(path: Path) -> configparser.ConfigParser:
    cp = IniFile()
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


# ------------------------------------------------------------------------------------------------ obs-websocket
#
# obs-websocket 5 has no bind-address setting: it listens on every interface (IPv4 and IPv6) on its port, so its
# password is what keeps other machines out. The installer therefore never turns authentication off or drops a
# password: it keeps the one the user has (or generates one, as obs-websocket itself does on its first load), keeps the
# port unless asked for another, records what it changed, and --uninstall puts back what was there before.

WS_INI_KEYS = {"enabled": "ServerEnabled", "port": "ServerPort", "auth": "AuthRequired", "password": "ServerPassword",
               "first_load": "FirstLoad"}
WS_JSON_KEYS = {"enabled": "server_enabled", "port": "server_port", "auth": "auth_required",
                "password": "server_password", "first_load": "first_load"}
WS_BACKUP_NAME = "websocket-before.json"  # in the install folder: the settings before sdlive, and what it wrote
PASSWORD_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
PASSWORD_LENGTH = 16  # as obs-websocket's own generated passwords


def ws_json_path(config_dir: Path) -> Path:
    return config_dir / "plugin_config" / "obs-websocket" / "config.json"


def _read_ws_json(config_dir: Path) -> dict | None:
    """config.json as a dict; None when it does not exist (or is not a JSON object)."""
    path = ws_json_path(config_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _read_ws_ini(config_dir: Path) -> dict[str, str] | None:
    """global.ini's [OBSWebSocket] section as raw strings; None when there is no such section."""
    cp = read_ini(config_dir / "global.ini")
    return dict(cp.items(WEBSOCKET_SECTION, raw=True)) if cp.has_section(WEBSOCKET_SECTION) else None


def websocket_settings(config_dir: Path) -> dict:
    """The websocket settings OBS will use: config.json (OBS 30+) if present, else global.ini (OBS 29)."""
    data = _read_ws_json(config_dir)
    if data is not None:
        try:
            return {
                "enabled": bool(data.get("server_enabled")),
                "port": int(data.get("server_port", DEFAULT_WS_PORT)),
                "auth_required": bool(data.get("auth_required")),
                "password": str(data.get("server_password") or ""),
                "source": str(ws_json_path(config_dir)),
            }
        except (ValueError, TypeError):
            pass
    sec = _read_ws_ini(config_dir)
    if sec is not None:
        try:
            port = int(sec.get("ServerPort", DEFAULT_WS_PORT))
        except ValueError:
            port = DEFAULT_WS_PORT
        return {
            "enabled": sec.get("ServerEnabled", "false").lower() == "true",
            "port": port,
            "auth_required": sec.get("AuthRequired", "false").lower() == "true",
            "password": sec.get("ServerPassword", ""),
            "source": str(config_dir / "global.ini"),
        }
    return {"enabled": False, "port": DEFAULT_WS_PORT, "auth_required": False, "password": "", "source": None}


def generate_password() -> str:
    import secrets

    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


def write_websocket_settings(config_dir: Path, *, enabled: bool, port: int, auth: bool, password: str) -> None:
    """Write the websocket settings as given to both places, no questions asked: for test configs and
    ``enable_websocket``; users' configs go through ``enable_websocket``."""
    ini, js = _ws_wanted(enabled=enabled, port=port, auth=auth, password=password)
    _write_ws(config_dir, dict[str, str | None](ini), js)


def _ws_wanted(*, enabled: bool, port: int, auth: bool, password: str) -> tuple[dict[str, str], dict]:
    ini = {WS_INI_KEYS["first_load"]: "false", WS_INI_KEYS["enabled"]: "true" if enabled else "false",
           WS_INI_KEYS["port"]: str(port), WS_INI_KEYS["auth"]: "true" if auth else "false",
           WS_INI_KEYS["password"]: password}
    js = {WS_JSON_KEYS["first_load"]: False, WS_JSON_KEYS["enabled"]: enabled, WS_JSON_KEYS["port"]: port,
          WS_JSON_KEYS["auth"]: auth, WS_JSON_KEYS["password"]: password}
    return ini, js


def _write_ws(config_dir: Path, ini: dict[str, str | None], js: dict | None, *, drop_json: bool = False,
              drop_section: bool = False) -> None:
    """Set (value) or remove (None) the given keys in global.ini's section and in config.json."""
    ini_path = config_dir / "global.ini"
    cp = read_ini(ini_path)
    if not cp.has_section(WEBSOCKET_SECTION):
        cp.add_section(WEBSOCKET_SECTION)
    for key, value in ini.items():
        if value is None:
            cp.remove_option(WEBSOCKET_SECTION, key)
        else:
            cp[WEBSOCKET_SECTION][key] = value
    if drop_section or not cp.items(WEBSOCKET_SECTION, raw=True):
        cp.remove_section(WEBSOCKET_SECTION)
    write_ini(ini_path, cp)
    path = ws_json_path(config_dir)
    if drop_json:
        path.unlink(missing_ok=True)
        return
    if js is None:
        return
    data = _read_ws_json(config_dir) or {}
    for key, value in js.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.sdlive-tmp")
    tmp.write_text(json.dumps(data, indent=4), encoding="utf-8")
    os.replace(tmp, path)


def _shown(key: str, value: object) -> str:
    """A setting's value for the report; a password is never printed."""
    if value is None:
        return "(unset)"
    if key in (WS_INI_KEYS["password"], WS_JSON_KEYS["password"]):
        return "(empty)" if not value else "(a password)"
    return json.dumps(value) if not isinstance(value, str) else value


def _diff(label: str, before: dict, after: dict) -> str | None:
    changed = [f"{k} {_shown(k, before.get(k))} → {_shown(k, v)}" for k, v in after.items() if before.get(k) != v]
    return f"{label}: " + ", ".join(changed) if changed else None


def enable_websocket(config_dir: Path, *, port: int | None = None, password: str | None = None,
                     dry_run: bool = False, backup_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """Turn obs-websocket on for `sdlive obs …` without weakening it: authentication on, the user's password kept
    (else ``password``, else a generated one), the port kept unless ``port`` is given; written to global.ini
    (OBS 29) and config.json (OBS 30+). The settings before are recorded in ``backup_dir`` for ``restore_websocket``.
    Returns (changes, notes): what changed, setting by setting, and what the user should know."""
    ini_before = _read_ws_ini(config_dir)
    js_before = _read_ws_json(config_dir)
    current = websocket_settings(config_dir)
    existing = str((js_before or {}).get(WS_JSON_KEYS["password"]) or "") or (ini_before or {}).get(
        WS_INI_KEYS["password"], "")
    notes: list[str] = []
    if password:
        chosen = password
        if existing and existing != password:
            notes.append("the existing websocket password was replaced by the one given with --ws-password")
    elif existing:
        chosen = existing
        notes.append("kept your websocket password")
    else:
        chosen = generate_password()
        notes.append(f"generated a websocket password ({PASSWORD_LENGTH} characters): see it in OBS → Tools → "
                     "WebSocket Server Settings → Show Connect Info")
    chosen_port = port or current["port"] or DEFAULT_WS_PORT
    ini_want, js_want = _ws_wanted(enabled=True, port=chosen_port, auth=True, password=chosen)
    changes = [c for c in (
        _diff(f"{config_dir / 'global.ini'} [{WEBSOCKET_SECTION}] (OBS 29)", ini_before or {}, ini_want),
        _diff(f"{ws_json_path(config_dir)} (OBS 30+)", js_before or {}, js_want),
    ) if c]
    notes.append(f"obs-websocket listens on port {chosen_port} of every network interface (it has no bind setting); "
                 f"its password keeps others out. To keep other machines off it entirely, block TCP {chosen_port} "
                 "in this computer's firewall")
    notes.append("`sdlive obs …` reads the websocket port and password from this OBS config by itself")
    if changes and not dry_run:
        if backup_dir is not None:
            _record_ws_backup(backup_dir, ini_before, js_before, ini_want, js_want)
        _write_ws(config_dir, dict(ini_want), js_want)
    return changes, notes


def _record_ws_backup(backup_dir: Path, ini_before: dict | None, js_before: dict | None, ini_want: dict,
                      js_want: dict) -> None:
    """Keep the settings from before the first install (a later install only updates what sdlive wrote)."""
    path = backup_dir / WS_BACKUP_NAME
    doc: dict = {}
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            doc = {}
    if "ini_before" not in doc:
        doc.update(ini_before=ini_before, json_before=js_before)
    doc.update(ini_written=ini_want, json_written=js_want)
    backup_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds passwords
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)


def restore_websocket(config_dir: Path, backup_dir: Path, *, dry_run: bool = False) -> list[str]:
    """Put back the websocket settings from before sdlive, key by key; a key the user changed since is left as they
    set it. Returns what changed (and what was left)."""
    path = backup_dir / WS_BACKUP_NAME
    if not path.is_file():
        return []
    doc = json.loads(path.read_text(encoding="utf-8"))
    actions: list[str] = []
    ini_now, js_now = _read_ws_ini(config_dir) or {}, _read_ws_json(config_dir)
    ini_before, js_before = doc.get("ini_before"), doc.get("json_before")
    ini_set: dict[str, str | None] = {}
    js_set: dict[str, object] = {}
    kept: list[str] = []
    for key, written in (doc.get("ini_written") or {}).items():
        if ini_now.get(key) != written:
            kept.append(f"global.ini {key}")
        elif (ini_before or {}).get(key) != written:
            ini_set[key] = (ini_before or {}).get(key)
    for key, written in (doc.get("json_written") or {}).items():
        if (js_now or {}).get(key) != written:
            kept.append(f"config.json {key}")
        elif (js_before or {}).get(key) != written:
            js_set[key] = (js_before or {}).get(key)
    after_ini = {k: v for k, v in {**ini_now, **ini_set}.items() if v is not None}
    after_js = {k: v for k, v in {**(js_now or {}), **js_set}.items() if v is not None}
    drop_json = js_before is None and js_now is not None and not after_js
    change = _diff(f"{config_dir / 'global.ini'} [{WEBSOCKET_SECTION}]", ini_now, {k: after_ini.get(k) for k in ini_set})
    if change:
        actions.append(change + " (as before sdlive)")
    if drop_json:
        actions.append(f"removed {ws_json_path(config_dir)} (it did not exist before sdlive)")
    elif js_set:
        change = _diff(str(ws_json_path(config_dir)), js_now or {}, {k: after_js.get(k) for k in js_set})
        if change:
            actions.append(change + " (as before sdlive)")
    if kept:
        actions.append("left as you changed them since the install: " + ", ".join(kept))
    if not dry_run and (ini_set or js_set or drop_json):
        _write_ws(config_dir, ini_set, None if drop_json else js_set, drop_json=drop_json,
                  drop_section=ini_before is None and not after_ini)
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


# ---------------------------------------------------------------------------------------------------- installer
#
# `python installer/install_obs.py` and `sdlive obs install` both run install_main(). Every step is idempotent,
# reports what it did (or would do, with --dry-run) through a stage callback, and --uninstall reverses it.

INSTALL_DIR_NAME = "sdlive"  # <OBS config dir>/sdlive/: the script's files, its protocol copy, the presets
PROTOCOL_FILES = ("constants.py", "ring.py", "secret.py")  # the stdlib-only part of daemon/protocol the script loads by path
Stage = Callable[[str, str], None]


class ScriptFiles(NamedTuple):
    """What the installer copies: the script folder's modules (side by side in the install folder), the protocol
    files (into its ``sdlive_protocol/``) and the shipped presets (into its ``presets/``)."""

    script: list[Path]
    protocol: list[Path]
    presets: list[Path]


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package (sdlive.daemon.protocol, sdlive.presets), if any."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _first_dir(*candidates: Path | None, holding: str) -> Path | None:
    return next((d for d in candidates if d is not None and d.is_dir() and any(d.glob(holding))), None)


def package_files() -> ScriptFiles:
    """The files the OBS side needs, from this source tree or the installed package."""
    root = Path(__file__).resolve().parents[1]
    protocol = _first_dir(root / "daemon" / "protocol", _package_dir("sdlive.daemon.protocol"), holding="ring.py")
    if protocol is None or not all((protocol / f).is_file() for f in PROTOCOL_FILES):
        raise FileNotFoundError(f"daemon/protocol/{{{','.join(PROTOCOL_FILES)}}} not found next to obs_bridge/: "
                                "reinstall sdlive")
    script = sorted(SCRIPT_SOURCE_DIR.glob("sdlive_*.py"))
    if SCRIPT_SOURCE_DIR / SCRIPT_NAMES.ENTRY_FILE not in script:
        raise FileNotFoundError(f"{SCRIPT_SOURCE_DIR / SCRIPT_NAMES.ENTRY_FILE} not found: reinstall sdlive")
    presets = _first_dir(root / "presets", _package_dir("sdlive.presets"), holding="*.toml")
    return ScriptFiles(
        script=script,
        protocol=[protocol / f for f in PROTOCOL_FILES],
        presets=sorted(presets.glob("*.toml")) if presets is not None else [],
    )


def installed_script(config_dir: Path) -> Path:
    """The entry file OBS loads, in the install folder."""
    return config_dir / INSTALL_DIR_NAME / SCRIPT_NAMES.ENTRY_FILE


def _run(cmd: list[str], timeout: float = 600) -> tuple[int, str]:
    import subprocess

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _sync_file(src: Path, dst: Path, *, dry_run: bool) -> bool:
    """Copy src to dst unless identical. Returns True when something changed."""
    if dst.is_file() and dst.read_bytes() == src.read_bytes():
        return False
    if not dry_run:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(dst.suffix + ".sdlive-tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return True


def _remove_stale_scripts(config_dir: Path, files: ScriptFiles, *, dry_run: bool, note: Callable[..., None]) -> None:
    """Script modules an older install left in the install folder (and any collection still listing one)."""
    dest = config_dir / INSTALL_DIR_NAME
    shipped = {p.name for p in files.script}
    stale = sorted(p for p in dest.glob("sdlive_*.py") if p.name not in shipped) if dest.is_dir() else []
    for coll in scene_collections(config_dir):
        for path in stale:
            action = remove_script_from_collection(coll, path, dry_run=dry_run)
            if action:
                note("scripts", action)
    for path in stale:
        if not dry_run:
            path.unlink()
        note("files", f"removed {path} (not part of this version)")


def install(
    config_dir: Path,
    *,
    collections: str = "current",
    websocket: bool = False,
    ws_port: int | None = None,
    ws_password: str | None = None,
    dry_run: bool = False,
    stage: Stage | None = None,
) -> list[str]:
    """Install (idempotent). Returns the list of changes made (or that would be made, with dry_run)."""
    changes: list[str] = []
    report: Stage = stage or (lambda name, msg: None)

    def note(name: str, msg: str, changed: bool = True) -> None:
        report(name, ("(dry run) " if dry_run and changed else "") + msg)
        if changed:
            changes.append(msg)

    files = package_files()
    dest = config_dir / INSTALL_DIR_NAME
    script = installed_script(config_dir)
    copies = [(src, dest / src.name) for src in files.script]
    copies += [(src, dest / SCRIPT_NAMES.PROTOCOL_DIR_NAME / src.name) for src in files.protocol]
    changed = [dst for src, dst in copies if _sync_file(src, dst, dry_run=dry_run)]
    if changed:
        note("files", f"copied {len(changed)} script file(s) → {dest}: " + ", ".join(
            str(p.relative_to(dest)) for p in changed))
    else:
        note("files", f"{dest} up to date", changed=False)
    n = sum(_sync_file(p, dest / SCRIPT_NAMES.PRESETS_DIR_NAME / p.name, dry_run=dry_run) for p in files.presets)
    if n:
        note("files", f"copied {n} preset file(s) → {dest / SCRIPT_NAMES.PRESETS_DIR_NAME} (hotkey names)")
    _remove_stale_scripts(config_dir, files, dry_run=dry_run, note=note)
    if collections == "all":
        targets = scene_collections(config_dir)
    elif collections == "current":
        cur = current_scene_collection(config_dir)
        targets = [cur] if cur else []
    else:
        targets = [config_dir / "basic" / "scenes" / f"{collections}.json"]
    if not targets:
        note("scripts", f"no scene collection yet: in OBS, Tools → Scripts → + → {script} (one click, remembered)",
             changed=False)
    for coll in targets:
        if not coll.is_file():
            raise FileNotFoundError(f"scene collection {coll} not found: pass --collection NAME or all")
        action = add_script_to_collection(coll, script, dry_run=dry_run)
        if action:
            note("scripts", action)
        else:
            note("scripts", f"{coll.name} already loads {script}", changed=False)
    if websocket:
        ws_changes, ws_notes = enable_websocket(config_dir, port=ws_port, password=ws_password, dry_run=dry_run,
                                                backup_dir=dest)
        for action in ws_changes:
            note("websocket", action)
        if not ws_changes:
            note("websocket", "already enabled with a password; nothing to change", changed=False)
        for line in ws_notes:
            note("websocket", line, changed=False)
    return changes


def uninstall(config_dir: Path, *, dry_run: bool = False, stage: Stage | None = None) -> list[str]:
    changes: list[str] = []
    report: Stage = stage or (lambda name, msg: None)
    dest = config_dir / INSTALL_DIR_NAME
    listed = sorted(dest.glob("sdlive_*.py")) if dest.is_dir() else []
    for coll in scene_collections(config_dir):
        for path in {installed_script(config_dir), *listed}:
            action = remove_script_from_collection(coll, path, dry_run=dry_run)
            if action:
                changes.append(action)
                report("scripts", ("(dry run) " if dry_run else "") + action)
    for action in restore_websocket(config_dir, dest, dry_run=dry_run):
        changes.append(action)
        report("websocket", ("(dry run) " if dry_run else "") + action)
    if dest.exists():
        changes.append(f"removed {dest}")
        report("files", ("(dry run) " if dry_run else "") + f"removed {dest}")
        if not dry_run:
            shutil.rmtree(dest)
    if not changes:
        report("files", "nothing to remove: sdlive is not installed in this OBS")
    return changes


def install_main(argv: list[str] | None = None) -> int:
    """Command line of installer/install_obs.py and `sdlive obs install`."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="install_obs.py",
        description="Install the sdlive OBS script (filter + preset hotkeys) into OBS. Close OBS first.",
    )
    ap.add_argument("--obs-config", help="OBS config directory (default: found for this OS)")
    ap.add_argument("--collection", default="current", help="scene collection to load the script in: NAME, current, all")
    ap.add_argument("--websocket", action="store_true",
                    help="enable obs-websocket for `sdlive obs …` (authentication on: your password is kept, or one "
                         "is generated; --uninstall restores the settings from before)")
    ap.add_argument("--ws-port", type=int, default=None, help="websocket port (default: the one OBS has, else 4455)")
    ap.add_argument("--ws-password", default=None, help="websocket password to set (default: keep yours, or generate one)")
    ap.add_argument("--models", metavar="NAME", help="also pull model weights: runs `sdlive models pull NAME`")
    ap.add_argument("--uninstall", action="store_true", help="remove the script from OBS and delete its folder")
    ap.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    ap.add_argument("--force", action="store_true", help="edit OBS's files even while OBS runs (it may undo them)")
    args = ap.parse_args(argv)
    if (args.ws_port is not None or args.ws_password is not None) and not args.websocket and not args.uninstall:
        ap.error("--ws-port and --ws-password go with --websocket")

    def stage(name: str, msg: str) -> None:
        print(f"[{name}] {msg}")

    try:
        config_dir = find_obs_config_dir(args.obs_config)
    except FileNotFoundError as exc:
        print(f"install_obs: {exc}", file=sys.stderr)
        return 2
    if not args.dry_run and not args.force and obs_running():
        print("install_obs: OBS is running; close it first (it rewrites its scene collection on exit) or pass --force",
              file=sys.stderr)
        return 2
    stage("obs", f"OBS config: {config_dir}")
    try:
        if args.uninstall:
            uninstall(config_dir, dry_run=args.dry_run, stage=stage)
            return 0
        changes = install(
            config_dir, collections=args.collection, websocket=args.websocket,
            ws_port=args.ws_port, ws_password=args.ws_password, dry_run=args.dry_run, stage=stage,
        )
    except (OSError, ValueError) as exc:
        print(f"install_obs: {exc}", file=sys.stderr)
        return 1
    if args.models:
        cmd = [sys.executable, "-c", "from sdlive.obs_bridge.cli import main; main()", "models", "pull", args.models]
        if args.dry_run:
            stage("models", f"(dry run) would run: sdlive models pull {args.models}")
        else:
            rc, out = _run(cmd, timeout=24 * 3600)
            stage("models", out[-500:] if out else f"sdlive models pull {args.models}: exit {rc}")
            if rc != 0:
                return rc
    stage("done", f"{len(changes)} change(s)" + (" (dry run: nothing written)" if args.dry_run else "")
          + "; start OBS, then right-click a source → Filters → + → sdlive (or `sdlive obs setup --source NAME`)")
    return 0
