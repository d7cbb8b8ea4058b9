"""Presets: the shipped set is valid; user presets override by name; broken files are reported by file and line."""

from __future__ import annotations

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
        ('steps = 2\n', None, "prompt"),
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
