"""Run the `sdlive` CLI with a recording virtual-camera backend registered (not a test module: the cam tests start
it as a subprocess so that keys can be typed into its stdin while it runs).

    python cam_recording_main.py RECORD_PREFIX cam --output vcam ...

The backend is registered under the name "recording" through ``pyvirtualcam.register_backend``, so a plain
``--output vcam`` finds it after the OS's own backends fail. Every frame's arrival time is appended to
``RECORD_PREFIX.log`` as it comes; at close all frames and times go to ``RECORD_PREFIX.npz``.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pyvirtualcam

PREFIX = sys.argv[1]


class RecordingCamera:
    def __init__(self, *, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw) -> None:
        self.shape = (height, width, 3)
        self.fourcc = fourcc
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.log = open(PREFIX + ".log", "w")  # noqa: SIM115 - closed in close()

    def send(self, frame: np.ndarray) -> None:
        now = time.monotonic()
        self.frames.append(frame.reshape(self.shape).copy())
        self.times.append(now)
        self.log.write(f"{now}\n")
        self.log.flush()

    def close(self) -> None:
        frames = np.stack(self.frames) if self.frames else np.zeros((0, *self.shape), np.uint8)
        np.savez(PREFIX + ".npz", frames=frames, times=np.asarray(self.times))
        self.log.close()

    def device(self) -> str:
        return "recording-cam"

    def native_fourcc(self):
        return self.fourcc


pyvirtualcam.register_backend("recording", RecordingCamera)

if __name__ == "__main__":
    from sdlive.obs_bridge.cli import main

    sys.argv = ["sdlive", *sys.argv[2:]]
    main()
