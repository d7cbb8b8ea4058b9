"""The relay of a dual-PC setup (``sdlive relay``): a local daemon whose model runs in a remote sdlive daemon."""

from .remote import RemoteEngine, RemoteSession

__all__ = ["RemoteEngine", "RemoteSession"]
