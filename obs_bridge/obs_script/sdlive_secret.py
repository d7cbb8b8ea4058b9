"""This user's local secret, read the daemon's way: ``daemon/protocol/secret.py`` (stdlib only by design) loaded by
path from the wire contract's folder (``sdlive_contract.PROTOCOL_DIR``), so the path rule (``SDLIVE_SECRET_FILE``,
else ``$XDG_RUNTIME_DIR/sdlive/secret``, …) and the owner-only checks are the daemon's own, never a copy.

A daemon with local auth (the default) takes only clients that send this secret as their ZMTP PLAIN password; the
filter's control connection (``sdlive_control``) does so when the daemon asks for PLAIN."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

from sdlive_contract import PACKAGE, PROTOCOL_DIR
from sdlive_names import PROTOCOL_DIR_NAME

MODULE = f"{PACKAGE}.secret"


class SecretUnavailable(OSError):
    """The secret cannot be read (not private, unreadable, or the contract's secret.py missing); says the fix."""


def _module() -> types.ModuleType:
    module = sys.modules.get(MODULE)
    if module is not None:
        return module
    path = os.path.join(PROTOCOL_DIR, "secret.py")
    if not os.path.isfile(path):
        raise SecretUnavailable(
            f"the daemon's secret.py is not in {PROTOCOL_DIR}: re-run `sdlive obs install` (it copies it to "
            f"<script dir>/{PROTOCOL_DIR_NAME}/)"
        )
    spec = importlib.util.spec_from_file_location(MODULE, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module  # kept across script reloads, like the rest of the contract
    return module


def secret_path() -> str:
    """Where this user's local secret is looked for (the daemon's rule)."""
    return str(_module().local_secret_path())


def read_secret() -> str | None:
    """This user's local secret, or None when there is no secret file (no daemon with local auth ran as this user);
    :class:`SecretUnavailable` when the file exists but is unusable (the message names the path and the fix)."""
    module = _module()
    try:
        return module.read_local_secret()
    except OSError as exc:  # LocalSecretError: a file others can read, someone else's, empty …
        raise SecretUnavailable(str(exc)) from None


def plain_username() -> bytes:
    """The ZMTP PLAIN user name the daemon's clients send."""
    return str(getattr(_module(), "PLAIN_USERNAME", "sdlive")).encode()
