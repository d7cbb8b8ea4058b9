"""installer/install_obs.py: copies the script folder and its wire-contract files where OBS loads them, lists the
entry file in the scene collection, clears out an older layout, enables the websocket in both places OBS versions
read it, is idempotent, has a dry run and an uninstall; and a real OBS started on the installed config runs the
installed copy with the installed contract."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import obs_skip_reason
from .harness import REPO, SCRIPT_DIR, SCRIPT_NAMES, HeadlessOBS, free_port, write_fresh_config

INSTALLER = REPO / "installer" / "install_obs.py"


def run_installer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INSTALLER), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def obs_config(tmp_path) -> Path:
    cfg = tmp_path / "obs-studio"
    write_fresh_config(cfg, ws_port=4466)
    return cfg


def _scripts(cfg: Path) -> list[str]:
    doc = json.loads((cfg / "basic" / "scenes" / "sdlive.json").read_text())
    return [e["path"] for e in doc["modules"]["scripts-tool"]]


def _same_files(dest: Path, sources: list[Path]) -> None:
    for src in sources:
        assert (dest / src.name).read_bytes() == src.read_bytes(), f"{dest / src.name} differs from {src}"


def test_install_copies_the_script_folder_contract_and_presets_and_lists_the_entry_file(obs_config):
    r = run_installer("--obs-config", str(obs_config), "--force")
    assert r.returncode == 0, r.stderr
    dest = obs_config / "sdlive"
    modules = sorted(SCRIPT_DIR.glob("sdlive_*.py"))
    assert SCRIPT_DIR / SCRIPT_NAMES.ENTRY_FILE in modules and len(modules) > 5
    _same_files(dest, modules)  # side by side: OBS puts the entry file's folder on sys.path
    protocol = REPO / "daemon" / "protocol"
    contract = [protocol / "constants.py", protocol / "ring.py", protocol / "secret.py"]  # secret.py: local auth
    _same_files(dest / SCRIPT_NAMES.PROTOCOL_DIR_NAME, contract)
    assert sorted(p.name for p in (dest / SCRIPT_NAMES.PROTOCOL_DIR_NAME).iterdir()) == [p.name for p in contract]
    assert (dest / "presets" / "anime.toml").is_file()
    assert _scripts(obs_config) == [str(dest / SCRIPT_NAMES.ENTRY_FILE)]
    assert (obs_config / "basic" / "scenes" / "sdlive.json.sdlive-backup").is_file()


def test_install_over_an_older_layout_removes_its_files_and_its_collection_entry(obs_config):
    """Before the script was a folder, the installer copied sdlive_obs.py and sdlive_ring.py and listed the former:
    loading both scripts would register the filter twice."""
    dest = obs_config / "sdlive"
    dest.mkdir()
    for name in ("sdlive_obs.py", "sdlive_ring.py"):
        (dest / name).write_text("# an older sdlive\n")
    collection = obs_config / "basic" / "scenes" / "sdlive.json"
    doc = json.loads(collection.read_text())
    doc["modules"]["scripts-tool"].append({"path": str(dest / "sdlive_obs.py"), "settings": {}})
    collection.write_text(json.dumps(doc))
    r = run_installer("--obs-config", str(obs_config), "--force")
    assert r.returncode == 0, r.stderr
    assert not (dest / "sdlive_obs.py").exists() and not (dest / "sdlive_ring.py").exists()
    assert _scripts(obs_config) == [str(dest / SCRIPT_NAMES.ENTRY_FILE)]


def test_install_twice_changes_nothing_the_second_time(obs_config):
    assert run_installer("--obs-config", str(obs_config), "--force").returncode == 0
    before = (obs_config / "basic" / "scenes" / "sdlive.json").read_text()
    r = run_installer("--obs-config", str(obs_config), "--force")
    assert r.returncode == 0
    assert "0 change(s)" in r.stdout
    assert (obs_config / "basic" / "scenes" / "sdlive.json").read_text() == before
    assert len(_scripts(obs_config)) == 1


def test_dry_run_writes_nothing(obs_config):
    before = {p: p.read_bytes() for p in obs_config.rglob("*") if p.is_file()}
    r = run_installer("--obs-config", str(obs_config), "--websocket", "--ws-port", "4999", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "(dry run)" in r.stdout and "would" not in r.stderr
    after = {p: p.read_bytes() for p in obs_config.rglob("*") if p.is_file()}
    assert after == before


def test_websocket_is_enabled_for_obs_29_and_obs_30(obs_config):
    r = run_installer("--obs-config", str(obs_config), "--force", "--websocket", "--ws-port", "4999",
                      "--ws-password", "s3cret")
    assert r.returncode == 0, r.stderr
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str
    cp.read(obs_config / "global.ini")
    ws = cp["OBSWebSocket"]
    assert (ws["ServerEnabled"], ws["ServerPort"], ws["AuthRequired"], ws["ServerPassword"]) == (
        "true", "4999", "true", "s3cret")
    js = json.loads((obs_config / "plugin_config" / "obs-websocket" / "config.json").read_text())
    assert (js["server_enabled"], js["server_port"], js["auth_required"], js["server_password"]) == (
        True, 4999, True, "s3cret")
    assert cp["General"]["FirstRun"] == "true"  # the rest of global.ini is kept


def _ws(cfg: Path) -> tuple[dict, dict]:
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str
    cp.read(cfg / "global.ini")
    js = json.loads((cfg / "plugin_config" / "obs-websocket" / "config.json").read_text())
    return dict(cp["OBSWebSocket"]), js


def _set_ws(cfg: Path, **ini: str) -> None:
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str
    cp.read(cfg / "global.ini")
    cp["OBSWebSocket"].update(ini)
    with open(cfg / "global.ini", "w") as fh:
        cp.write(fh, space_around_delimiters=False)


def test_websocket_keeps_the_users_password_and_port(tmp_path):
    cfg = tmp_path / "obs-studio"
    write_fresh_config(cfg, ws_port=4466, ws_password="mine-1234")
    r = run_installer("--obs-config", str(cfg), "--force", "--websocket")
    assert r.returncode == 0, r.stderr
    ini, js = _ws(cfg)
    assert (ini["AuthRequired"], ini["ServerPassword"], ini["ServerPort"]) == ("true", "mine-1234", "4466")
    assert (js["auth_required"], js["server_password"], js["server_port"]) == (True, "mine-1234", 4466)
    assert "kept your websocket password" in r.stdout and "mine-1234" not in r.stdout


def test_websocket_without_a_password_gets_a_generated_one_that_is_never_printed(obs_config):
    before_ini, _ = _ws(obs_config)
    assert before_ini["AuthRequired"] == "false" and before_ini["ServerPassword"] == ""
    r = run_installer("--obs-config", str(obs_config), "--force", "--websocket")
    assert r.returncode == 0, r.stderr
    ini, js = _ws(obs_config)
    password = ini["ServerPassword"]
    assert len(password) == 16 and password.isalnum() and js["server_password"] == password
    assert ini["AuthRequired"] == "true" and js["auth_required"] is True
    assert ini["ServerPort"] == "4466"  # kept
    assert password not in r.stdout + r.stderr
    # what changed, setting by setting, and what obs-websocket's bind means
    assert "AuthRequired false → true" in r.stdout and "ServerPassword (empty) → (a password)" in r.stdout
    assert "every network interface" in r.stdout and "firewall" in r.stdout
    backup = obs_config / "sdlive" / "websocket-before.json"
    assert backup.stat().st_mode & 0o077 == 0  # it holds passwords: owner only


def test_uninstall_restores_the_websocket_settings_from_before(obs_config):
    ini_before, js_before = _ws(obs_config)
    assert run_installer("--obs-config", str(obs_config), "--force", "--websocket").returncode == 0
    assert _ws(obs_config) != (ini_before, js_before)
    r = run_installer("--obs-config", str(obs_config), "--force", "--uninstall")
    assert r.returncode == 0, r.stderr
    assert _ws(obs_config) == (ini_before, js_before)
    assert "as before sdlive" in r.stdout


def test_uninstall_leaves_a_websocket_setting_the_user_changed_since(obs_config):
    assert run_installer("--obs-config", str(obs_config), "--force", "--websocket").returncode == 0
    _set_ws(obs_config, ServerPassword="changed-later")
    r = run_installer("--obs-config", str(obs_config), "--force", "--uninstall")
    assert r.returncode == 0, r.stderr
    ini, js = _ws(obs_config)
    assert ini["ServerPassword"] == "changed-later" and ini["AuthRequired"] == "false"
    assert js["server_password"] == "" and js["auth_required"] is False
    assert "left as you changed them since the install: global.ini ServerPassword" in r.stdout


def test_ws_options_without_websocket_are_refused(obs_config):
    r = run_installer("--obs-config", str(obs_config), "--force", "--ws-password", "x")
    assert r.returncode == 2 and "go with --websocket" in r.stderr


def test_uninstall_reverses_the_install(obs_config):
    assert run_installer("--obs-config", str(obs_config), "--force").returncode == 0
    r = run_installer("--obs-config", str(obs_config), "--uninstall", "--force")
    assert r.returncode == 0, r.stderr
    assert not (obs_config / "sdlive").exists()
    assert _scripts(obs_config) == []
    r = run_installer("--obs-config", str(obs_config), "--uninstall", "--force")
    assert "nothing to remove" in r.stdout


def test_missing_obs_config_is_a_clear_error(tmp_path):
    r = run_installer("--obs-config", str(tmp_path / "nope" / "obs-studio"))
    assert r.returncode != 0
    assert "global.ini" in r.stderr or "scene collection" in r.stderr or "not found" in r.stderr


@pytest.mark.obs
@pytest.mark.slow
def test_obs_started_on_the_installed_config_runs_the_installed_script(tmp_path):
    reason = obs_skip_reason()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    cfg = home / ".config" / "obs-studio"
    port = free_port()
    write_fresh_config(cfg, ws_port=port)
    r = run_installer("--obs-config", str(cfg), "--force")
    assert r.returncode == 0, r.stderr
    o = HeadlessOBS(home, ws_port=port)
    o.start()
    try:
        cl = o.client()
        names = cl.get_hotkey_list().hotkeys
        assert "sdlive.preset.anime" in names and "sdlive.preset.next" in names
        cl.create_input("Main", "bg", "color_source_v3", {"color": 0xFF808080, "width": 64, "height": 64}, True)
        cl.create_source_filter("bg", "sdlive", "sdlive_filter", {})
        assert [f["filterKind"] for f in cl.get_source_filter_list("bg").filters] == ["sdlive_filter"]
        cl.disconnect()
    finally:
        assert o.stop() == 0
    log = o.log_text()
    assert f"Loaded python script: {SCRIPT_NAMES.ENTRY_FILE}" in log
    protocol = cfg / "sdlive" / SCRIPT_NAMES.PROTOCOL_DIR_NAME  # the installed contract, not the checkout's
    assert f"from {protocol})" in log, log[-3000:]
    assert "Traceback" not in log


@pytest.mark.obs
@pytest.mark.slow
def test_sdlive_obs_finds_the_password_the_installer_generated(tmp_path):
    """After `--websocket`, `sdlive obs status` on the same machine needs no flag: it reads OBS's config."""
    reason = obs_skip_reason()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    cfg = home / ".config" / "obs-studio"
    port = free_port()
    write_fresh_config(cfg, ws_port=port)
    assert run_installer("--obs-config", str(cfg), "--force", "--websocket").returncode == 0
    password = _ws(cfg)[0]["ServerPassword"]
    o = HeadlessOBS(home, ws_port=port, ws_password=password)
    o.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDLIVE_OBS_")}
        env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
        cli = [sys.executable, "-c", "from sdlive.obs_bridge.cli import main; main()", "obs", "status", "--json"]
        r = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["script_loaded"] is True
        r = subprocess.run(cli, capture_output=True, text=True, env={**env, "SDLIVE_OBS_PASSWORD": "wrong"},
                           timeout=60)
        assert r.returncode == 1 and "refused the connection" in r.stderr and "Traceback" not in r.stderr
        assert "SDLIVE_OBS_PASSWORD" in r.stderr
    finally:
        assert o.stop() == 0
