"""Preset loading: shipped ``sdlive.presets`` TOML files, then the user's preset folder, then extra folders.

A preset is one TOML file (``presets/<name>.toml``)::

    name = "anime"                 # optional, defaults to the file name
    prompt = "anime style, ..."    # required
    steps = 2                      # 1–4 denoising steps
    noise_scale = 0.7              # 0–1: how far the model may move away from the input
    seed = 42
    transition_chunks = 4          # chunks over which a switch to this preset blends in
    hotkey = "ctrl+shift+1"        # suggestion for the OBS hotkey binding
    description = "..."
    lora = "styles/ink.safetensors"  # optional LoRA file (relative to this folder), switched live with the preset
    lora_strength = 0.8

A later folder overrides an earlier one by preset name (user presets override shipped ones). A broken file is
reported by file and line and skipped; it never stops the daemon. A running daemon sees new, edited and deleted
files without a restart (:meth:`PresetLibrary.refresh`, called when a client asks for presets: a stat of each file,
at most once a second); a file that breaks in an edit keeps its last good preset, with the problem reported. Presets are indexed by their position in the sorted
name list (:meth:`PresetLibrary.names`), as ``list_presets`` reports them.

No torch here (the CLI and OBS side import this module).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from platformdirs import user_config_dir
from pydantic import ConfigDict, Field, ValidationError, field_validator

from .protocol.params import Prompt, StyleParams

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

PRESET_SUFFIX = ".toml"
MAX_PRESET_FILES = 512
"""Preset files read per folder (a folder of thousands must not make every refresh slow)."""
REFRESH_INTERVAL_S = 1.0
"""``refresh`` stats every preset file at most this often; a file added, removed or saved by rename (as editors do)
changes its folder's mtime, one stat per folder, which ``refresh`` checks every time."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Preset(StyleParams):
    """One named style (``StyleParams`` plus a name): what ``set_preset`` applies to a session."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_assignment=False)

    name: str
    prompt: Prompt  # required in a preset file (the other fields have the protocol's defaults)
    hotkey: str | None = None
    description: str | None = None
    lora: str | None = None
    """A LoRA style file (``.safetensors``, diffusers or original Wan layout), relative to this preset's folder."""
    lora_strength: float = Field(default=1.0, ge=-2.0, le=2.0)
    """The LoRA's weight (1: as trained, 0: off)."""
    source: str | None = Field(default=None, exclude=True)
    """The file it came from (not part of the TOML)."""

    def lora_path(self) -> str | None:
        """The LoRA file's absolute path (a relative ``lora`` is taken from the preset file's folder)."""
        if self.lora is None:
            return None
        path = Path(self.lora).expanduser()
        if not path.is_absolute() and self.source is not None:
            path = Path(self.source).parent / path
        return str(path)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"preset name {value!r} must be 1–64 letters, digits, '-', '_' or '.', starting with a letter or digit"
            )
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        return " ".join(value.split()) if isinstance(value, str) else value  # TOML multi-line strings read as one line

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (``list_presets``)."""
        return self.model_dump(mode="json", exclude_none=True)


@dataclass(frozen=True)
class PresetProblem:
    """A preset file that could not be used."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{where}: {self.message}"


_Stamp = tuple[tuple[str, bool, tuple[tuple[str, int, int], ...]], ...]


@dataclass
class PresetLibrary:
    """The presets in effect, by name, plus the problems found while loading.

    Thread-safe to read while another thread refreshes it: :meth:`refresh` swaps whole new ``presets`` and
    ``problems`` objects in, it never mutates the ones a reader may hold."""

    presets: dict[str, Preset] = field(default_factory=dict)
    problems: list[PresetProblem] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    extra_dirs: list[Path] = field(default_factory=list)
    """The folders asked for explicitly (a missing one is a problem; a missing shipped/user folder is not)."""
    version: int = 0
    """Grows by one each time a refresh changed what is loaded."""
    _stamp: _Stamp | None = field(default=None, repr=False)
    _checked: float = field(default=0.0, repr=False)
    _folders: tuple[int, ...] = field(default=(), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def refresh(self, *, min_interval_s: float = REFRESH_INTERVAL_S) -> bool:
        """Reload if a preset file was added, edited or removed since the last look (at most once per
        ``min_interval_s``); True when something changed. A file that fails now but loaded before keeps its
        last good preset, and its problem says so."""
        with self._lock:
            now = time.monotonic()
            folders = _folder_mtimes(self.dirs)
            if self._stamp is not None and now - self._checked < min_interval_s and folders == self._folders:
                return False
            self._checked, self._folders = now, folders
            stamp = _stamp_of(self.dirs)
            if stamp == self._stamp:
                return False
            fresh = _load_dirs(self.dirs, self.extra_dirs)
            problems = []
            for problem in fresh.problems:
                kept = self._last_good(problem.path, fresh)
                if kept is not None:
                    fresh.presets[kept.name] = kept
                    problem = replace(problem, message=f"{problem.message} (keeping its last good version)")
                problems.append(problem)
            changed = self._stamp is not None
            self.presets, self.problems, self._stamp = fresh.presets, problems, stamp
            if changed:
                self.version += 1
                log.info("presets reloaded: %d preset(s), %d problem(s)", len(self.presets), len(problems))
            return changed

    def _last_good(self, path: Path, fresh: PresetLibrary) -> Preset | None:
        """The preset ``path`` gave before, if it still wins its name (no other file now defines it later)."""
        for old in self.presets.values():
            if old.source == str(path):
                now = fresh.presets.get(old.name)
                if now is None or _folder_rank(self.dirs, now.source) < _folder_rank(self.dirs, old.source):
                    return old
        return None

    def names(self) -> list[str]:
        """Sorted names; position i is ``list_presets``' ``index`` i."""
        return sorted(self.presets)

    def get(self, name: str) -> Preset:
        try:
            return self.presets[name]
        except KeyError:
            raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(self.names()) or '(none)'}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.presets

    def __len__(self) -> int:
        return len(self.presets)


def shipped_presets_dir() -> Path:
    """The folder of the presets shipped in the wheel (package ``sdlive.presets``)."""
    return Path(str(resources.files("sdlive.presets")))


def user_presets_dir() -> Path:
    """``user_config_dir("sdlive")/presets``: the user's presets override shipped ones by name."""
    return Path(user_config_dir("sdlive")) / "presets"


def _line_of_key(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def load_preset_file(path: Path) -> Preset:
    """Parse and validate one preset file; raises :class:`PresetFileError` naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetFileError(PresetProblem(path, None, f"cannot read: {exc}")) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = int(match.group(1)) if match else None
        if line is None and "end of document" in str(exc):
            line = max(1, len(text.splitlines()))
        raise PresetFileError(PresetProblem(path, line, f"not valid TOML: {exc}")) from exc
    data.setdefault("name", path.stem)
    try:
        return Preset(**data, source=str(path))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        line = _line_of_key(text, key) if key else None
        what = f"{key}: " if key else ""
        more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown key; allowed keys: {', '.join(f for f in Preset.model_fields if f != 'source')}"
        raise PresetFileError(PresetProblem(path, line, f"{what}{message}{more}")) from exc
    except TypeError as exc:  # e.g. a key that collides with a keyword (source=)
        raise PresetFileError(PresetProblem(path, None, str(exc))) from exc


class PresetFileError(ValueError):
    def __init__(self, problem: PresetProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def load_presets(
    extra_dirs: list[Path] | tuple[Path, ...] = (),
    *,
    shipped: bool = True,
    user: bool = True,
) -> PresetLibrary:
    """Load shipped presets, then the user's, then ``extra_dirs`` (later wins by name); problems are logged and kept."""
    dirs: list[Path] = []
    if shipped:
        dirs.append(shipped_presets_dir())
    if user:
        dirs.append(user_presets_dir())
    extra = [Path(d).expanduser() for d in extra_dirs]
    dirs.extend(extra)
    library = _load_dirs(dirs, extra)
    library._stamp, library._checked, library._folders = _stamp_of(dirs), time.monotonic(), _folder_mtimes(dirs)
    return library


def _preset_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{PRESET_SUFFIX}"))[:MAX_PRESET_FILES]


def _stamp_of(dirs: list[Path]) -> _Stamp:
    """What a refresh compares: each folder's preset files with their mtime and size (a stat each, no reads)."""
    stamp = []
    for folder in dirs:
        files: list[tuple[str, int, int]] = []
        exists = folder.is_dir()
        if exists:
            for path in _preset_files(folder):
                try:
                    st = path.stat()
                except OSError:
                    continue
                files.append((path.name, st.st_mtime_ns, st.st_size))
        stamp.append((str(folder), exists, tuple(files)))
    return tuple(stamp)


def _folder_mtimes(dirs: list[Path]) -> tuple[int, ...]:
    """Each folder's mtime (-1: missing): it changes when a file in it is added, removed or renamed."""
    out = []
    for folder in dirs:
        try:
            out.append(folder.stat().st_mtime_ns)
        except OSError:
            out.append(-1)
    return tuple(out)


def _folder_rank(dirs: list[Path], source: str | None) -> int:
    if source is None:
        return -1
    parent = Path(source).parent
    return max((i for i, d in enumerate(dirs) if d == parent), default=-1)


def _load_dirs(dirs: list[Path], extra: list[Path]) -> PresetLibrary:
    library = PresetLibrary(dirs=dirs, extra_dirs=extra)
    for folder in dirs:
        if not folder.is_dir():
            if folder in extra:
                library.problems.append(PresetProblem(folder, None, "preset folder does not exist"))
            continue
        for path in _preset_files(folder):
            try:
                preset = load_preset_file(path)
            except PresetFileError as exc:
                library.problems.append(exc.problem)
                log.warning("skipping preset %s", exc.problem)
                continue
            if preset.name in library.presets:
                log.debug("preset %s from %s overrides %s", preset.name, path, library.presets[preset.name].source)
            library.presets[preset.name] = preset
    return library
