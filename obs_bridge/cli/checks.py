"""What a media command checks before it starts or even asks a daemon: the session size, the preset, the prompt.

Sizes follow the OBS filter's rule: a daemon session's width and height are multiples of ``SIZE_MULTIPLE`` (16),
so a frame size that is not is restyled at the size rounded **down** to multiples of 16 and scaled back to the
size asked for (640×360 → 640×352 → 640×360), with one line saying so.
"""

from __future__ import annotations

from typing import Any

from sdlive.daemon.protocol.constants import MAX_HEIGHT, MAX_WIDTH, MIN_SIZE, SIZE_MULTIPLE

__all__ = ["CheckError", "check_params", "check_preset_on_disk", "session_size", "size_note"]


class CheckError(ValueError):
    """A value the daemon would refuse; the message names it and the fix."""


def session_size(width: int, height: int) -> tuple[int, int]:
    """The daemon session's size for frames of ``width``×``height``: each side rounded down to a multiple of
    ``SIZE_MULTIPLE`` (as the OBS filter does), checked against the daemon's bounds."""
    if width < MIN_SIZE or height < MIN_SIZE:
        raise CheckError(f"{width}x{height} is too small: the daemon restyles frames of at least {MIN_SIZE}x{MIN_SIZE} "
                         f"(pass --width/--height)")
    w, h = width // SIZE_MULTIPLE * SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE
    if w > MAX_WIDTH or h > MAX_HEIGHT:
        raise CheckError(f"{width}x{height} is too large: at most {MAX_WIDTH}x{MAX_HEIGHT} (pass a smaller "
                         f"--width/--height, e.g. --height 720)")
    return w, h


def size_note(width: int, height: int) -> str | None:
    """The one line saying a size was rounded, or None when it is a multiple of ``SIZE_MULTIPLE`` already."""
    w, h = session_size(width, height)
    if (w, h) == (width, height):
        return None
    return (f"{width}x{height} is restyled at {w}x{h} (sessions are multiples of {SIZE_MULTIPLE}, rounded down as the "
            f"OBS filter does) and scaled back to {width}x{height}")


def check_params(*, prompt: str | None = None, steps: int | None = None) -> dict[str, Any] | None:
    """``open_session``'s ``params`` for these options, validated by the protocol's own model (the bounds the
    daemon applies), or None when none is given."""
    from pydantic import ValidationError

    from sdlive.daemon.protocol.messages import ParamsUpdate, summarize_validation_error

    fields: dict[str, Any] = {}
    if prompt is not None:
        if not prompt.strip():
            raise CheckError('--prompt is empty: give the look you want, e.g. --prompt "a watercolor painting"')
        fields["prompt"] = prompt.strip()
    if steps is not None:
        fields["steps"] = steps
    if not fields:
        return None
    try:
        ParamsUpdate(**fields)
    except ValidationError as exc:
        raise CheckError(f"--prompt/--steps: {summarize_validation_error(exc)}") from None
    return fields


def check_preset_on_disk(preset: str | None) -> None:
    """Before a daemon is started for this command: the preset must be one of the preset files it will load
    (shipped ones and the user's). A running daemon's own list is checked once it answers."""
    if preset is None:
        return
    from sdlive.daemon.presets import load_presets, user_presets_dir

    library = load_presets()
    if preset not in library:
        raise CheckError(f"unknown preset {preset!r}: use one of {', '.join(library.names())} (or add "
                         f"{user_presets_dir() / (preset + '.toml')})")
