"""Presets: the shipped set is valid; user presets override by name; broken files are reported by file and line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdlive.daemon.engine import SessionParams
from sdlive.daemon.presets import Preset, load_preset_file, load_presets, shipped_presets_dir


@pytest.fixture
def no_user(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    return tmp_path / "cfg" / "sdlive" / "presets"


def test_shipped_presets_are_valid_and_engine_ready(no_user):
    library = load_presets()
    assert not library.problems, library.problems
    assert {"anime", "watercolor", "cyberpunk", "oil-painting", "claymation", "pencil-sketch"} <= set(library.names())
    hotkeys = [p.hotkey for p in library.presets.values()]
    assert all(hotkeys) and len(set(hotkeys)) == len(hotkeys)
    for preset in library.presets.values():
        SessionParams(**preset.style())  # the engine accepts every shipped preset as is
        assert Path(preset.source).parent == shipped_presets_dir()
    assert len(list(shipped_presets_dir().glob("*.toml"))) == len(library)


def test_user_preset_overrides_shipped_one(no_user):
    no_user.mkdir(parents=True)
    (no_user / "anime.toml").write_text('prompt = "my own anime look"\nsteps = 1\n')
    (no_user / "mine.toml").write_text('name = "mine"\nprompt = "something new"\n')
    library = load_presets()
    assert library.get("anime").prompt == "my own anime look" and library.get("anime").steps == 1
    assert "mine" in library


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ('prompt = "ok"\nsteps = 9\n', 2, "steps"),
        ('prompt = "ok"\n\nnoise_scale = 0\n', 3, "noise_scale"),
        ('prompt = "ok"\ncolour = "red"\n', 2, "unknown key"),
        ("steps = 2\n", None, "prompt"),
        ('prompt = "ok"\nsteps = [\n', 2, "not valid TOML"),
        ('prompt = "   "\n', 1, "prompt"),
    ],
)
def test_broken_file_is_reported_by_file_and_line_and_skipped(tmp_path, no_user, text, line, needle):
    folder = tmp_path / "extra"
    folder.mkdir()
    (folder / "broken.toml").write_text(text)
    (folder / "fine.toml").write_text('prompt = "fine"\n')
    library = load_presets([folder])
    assert "fine" in library and "broken" not in library
    (problem,) = library.problems
    assert problem.path == folder / "broken.toml"
    assert problem.line == line
    assert needle in problem.message
    assert str(problem).startswith(f"{folder / 'broken.toml'}{':' + str(line) if line else ''}")


def test_missing_extra_folder_is_reported(tmp_path, no_user):
    library = load_presets([tmp_path / "nowhere"])
    assert any("does not exist" in p.message for p in library.problems)


def test_preset_name_defaults_to_file_name(tmp_path):
    path = tmp_path / "neon-dreams.toml"
    path.write_text('prompt = "neon"\n')
    preset = load_preset_file(path)
    assert isinstance(preset, Preset) and preset.name == "neon-dreams"


# ------------------------------------------------------------------------------------------- reload on change


def _write(path: Path, prompt: str, **extra: object) -> None:
    lines = [f'prompt = "{prompt}"', *(f"{k} = {v}" for k, v in extra.items())]
    path.write_text("\n".join(lines) + "\n")


def test_refresh_sees_new_edited_and_deleted_files(tmp_path, no_user):
    folder = tmp_path / "extra"
    folder.mkdir()
    library = load_presets([folder], shipped=False)
    assert library.names() == [] and not library.refresh(min_interval_s=0)
    _write(folder / "neon.toml", "neon city")
    assert library.refresh(min_interval_s=0) and library.names() == ["neon"] and library.version == 1
    _write(folder / "neon.toml", "neon city at night, rain", steps=3)
    assert library.refresh(min_interval_s=0)
    assert library.get("neon").prompt == "neon city at night, rain" and library.get("neon").steps == 3
    (folder / "neon.toml").unlink()
    assert library.refresh(min_interval_s=0) and library.names() == []
    assert not library.refresh(min_interval_s=0)  # nothing changed: no reload


def test_a_file_broken_by_an_edit_keeps_its_last_good_preset(tmp_path, no_user):
    folder = tmp_path / "extra"
    folder.mkdir()
    _write(folder / "neon.toml", "neon city")
    library = load_presets([folder], shipped=False)
    (folder / "neon.toml").write_text('prompt = "neon city\nsteps = 9\n')  # half-saved: an unterminated string
    assert library.refresh(min_interval_s=0)
    assert library.get("neon").prompt == "neon city"
    [problem] = library.problems
    assert "neon.toml" in str(problem) and "keeping its last good version" in str(problem)
    _write(folder / "neon.toml", "neon city", steps=9)  # valid TOML, invalid preset
    library.refresh(min_interval_s=0)
    assert library.get("neon").steps == 2 and "steps" in str(library.problems[0])
    _write(folder / "neon.toml", "neon city", steps=4)
    library.refresh(min_interval_s=0)
    assert library.get("neon").steps == 4 and library.problems == []


def test_refresh_stats_the_files_at_most_once_per_interval(tmp_path, no_user):
    folder = tmp_path / "extra"
    folder.mkdir()
    _write(folder / "a.toml", "a")
    library = load_presets([folder], shipped=False)
    mtime = (folder / "a.toml").stat().st_mtime_ns
    _write(folder / "a.toml", "a, edited in place")  # the folder's mtime does not change
    os.utime(folder / "a.toml", ns=(mtime + 10**9, mtime + 10**9))
    assert not library.refresh(min_interval_s=60)  # load_presets just looked: bounded work per request
    assert library.refresh(min_interval_s=0) and library.get("a").prompt == "a, edited in place"


def test_a_new_file_is_seen_by_the_very_next_refresh(tmp_path, no_user):
    """Adding (or removing, or saving by rename) a file changes its folder's mtime: one stat, checked every time."""
    folder = tmp_path / "extra"
    folder.mkdir()
    library = load_presets([folder], shipped=False)
    _write(folder / "a.toml", "a")
    assert library.refresh(min_interval_s=60) and library.names() == ["a"]
    (folder / "a.toml").unlink()
    assert library.refresh(min_interval_s=60) and library.names() == []


def test_a_running_daemon_picks_up_new_and_edited_preset_files(tmp_path, daemon_factory, wait_for):
    folder = tmp_path / "live-presets"
    folder.mkdir()
    proc = daemon_factory("--preset-dir", str(folder))
    with proc.client() as client:
        assert "neon" not in {p.name for p in client.list_presets().presets}
        _write(folder / "neon.toml", "neon city", steps=1)
        assert wait_for(lambda: "neon" in {p.name for p in client.list_presets().presets}, 10)
        session = client.open_session(width=64, height=64, fps=15, preset="anime")
        try:
            assert client.set_preset(session.session_id, "neon").params.steps == 1
            (folder / "neon.toml").write_text("prompt = [broken\n")
            assert wait_for(lambda: any("neon.toml" in p for p in client.list_presets().problems), 10)
            reply = client.list_presets()
            assert "neon" in {p.name for p in reply.presets} and "keeping its last good version" in reply.problems[0]
            assert client.set_preset(session.session_id, "neon").preset == "neon"  # the last good one still applies
        finally:
            session.close()
