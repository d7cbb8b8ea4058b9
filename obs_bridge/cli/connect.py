"""Which daemon a command talks to, one rule for every command, and the one-line errors when that goes wrong.

The address and token come from, in order: the command's flag (``--address``/``--daemon``, ``--token``), the
environment (``SDLIVE_CONTROL``, ``SDLIVE_PUB``, ``SDLIVE_TOKEN``), the config file the daemon reads too
(``SDLIVE_CONFIG`` or ``config.toml`` in the user config folder: keys ``control``, ``pub``, ``token``), then the
defaults (``tcp://127.0.0.1:5557``/``:5558``). A bad address is one line naming what is wrong and a right example.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdlive.daemon.protocol.constants import DEFAULT_CONTROL_ADDRESS, DEFAULT_PUB_ADDRESS, host_of

from ..client import InvalidAddress, check_address

__all__ = ["Target", "TargetError", "config_file", "resolve_target"]


class TargetError(Exception):
    """The daemon's address cannot be used (malformed, unresolvable, a broken config file): one line to show."""


@dataclass(frozen=True)
class Target:
    """Where a command's daemon is: ``control``/``pub`` addresses, its ``token``, and where each came from."""

    control: str
    pub: str
    token: str | None
    control_from: str
    """``flag``, ``SDLIVE_CONTROL``, the config file's path, or ``default``."""

    @property
    def explicit(self) -> bool:
        """Given on the command line (a command then never starts a daemon of its own in its place)."""
        return self.control_from == "flag"


def config_file() -> Path:
    """The config file clients and the daemon read: ``SDLIVE_CONFIG``, else ``<user config dir>/config.toml``."""
    explicit = os.environ.get("SDLIVE_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("sdlive")) / "config.toml"


def _config_values() -> tuple[dict[str, Any], Path | None]:
    path = config_file()
    if not path.is_file():
        if os.environ.get("SDLIVE_CONFIG"):
            raise TargetError(f"config file {path} (SDLIVE_CONFIG) does not exist: create it or unset SDLIVE_CONFIG")
        return {}, None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), path
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TargetError(f"config file {path}: {exc}") from None


def check_reachable_name(address: str, where: str = "") -> None:
    """A TCP address whose host name does not resolve fails here at once (instead of a silent connect timeout)."""
    if not address.startswith("tcp://"):
        return
    host = host_of(address)
    if host in ("*", "localhost") or not host:
        return
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        origin = f" (from {where})" if where else ""
        raise TargetError(f"daemon address {address}{origin}: host {host!r} does not resolve (check the name, or "
                          f"use the GPU box's IP address, e.g. tcp://192.168.1.20:5557)") from None


def resolve_target(address: str | None = None, token: str | None = None, *, what: str = "--address") -> Target:
    """The daemon this command means (flags > env > config file > defaults), addresses checked.

    Raises :class:`TargetError` with one line when an address is malformed or its host does not resolve."""
    values: dict[str, Any] = {}
    path: Path | None = None
    if not (address and token):
        values, path = _config_values()
    sources: list[tuple[str | None, str]] = [
        (address, "flag"),
        (os.environ.get("SDLIVE_CONTROL") or None, "SDLIVE_CONTROL"),
        (values.get("control"), str(path)),
    ]
    control, control_from = next(((v, src) for v, src in sources if v), (DEFAULT_CONTROL_ADDRESS, "default"))
    pub = os.environ.get("SDLIVE_PUB") or values.get("pub") or DEFAULT_PUB_ADDRESS
    where = {"flag": what, "SDLIVE_CONTROL": "SDLIVE_CONTROL", "default": "the default"}.get(control_from,
                                                                                        f"control in {path}")
    for name, value in (("control", control), ("pub", pub)):
        if not isinstance(value, str):
            raise TargetError(f"{name} in {path} must be a string like {DEFAULT_CONTROL_ADDRESS}, got {value!r}")
    try:
        check_address(control)
    except InvalidAddress as exc:
        raise TargetError(f"{exc.message} (from {where})") from None
    check_reachable_name(control, where)
    try:
        check_address(pub)
    except InvalidAddress as exc:
        raise TargetError(f"{exc.message.replace('daemon address', 'PUB address')} (from SDLIVE_PUB or pub in the "
                          f"config file)") from None
    chosen_token = token or os.environ.get("SDLIVE_TOKEN") or values.get("token") or None
    if chosen_token is not None and not isinstance(chosen_token, str):
        raise TargetError(f"token in {path} must be a string")
    return Target(control=control, pub=pub, token=chosen_token, control_from=control_from)
