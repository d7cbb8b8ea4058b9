"""Shipped presets (TOML files). Loaded by sdlive.daemon.presets."""
