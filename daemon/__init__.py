"""The sdlive daemon: model, engine, wire protocol and server (``sdlive serve``)."""

import os

# OpenMP's default spin-wait collapses torch's CPU throughput when the cores are shared (OBS, a game, the encoder):
# measured 8 → 34 FPS for the tiny model on a loaded 2-core machine. It must be set before torch loads OpenMP;
# an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
