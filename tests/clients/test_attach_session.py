"""`sdlive cam --attach SESSION` (and the `attach:SESSION` source) mirrors another client's session, e.g. an OBS
filter's, without taking frames from it: the owner still receives every output in order, and the mirrored frames
are the owner's frames."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from sdlive.obs_bridge.cli import app
from sdlive.obs_bridge.media.capture import SourceError, open_source, synthetic_frame

SIZE, FPS = 128, 10.0


@pytest.mark.slow
def test_attach_mirrors_a_session_without_stealing_its_frames(daemon, recording_cam):
    received: list = []
    stop = threading.Event()
    with daemon.client(timeout_s=30) as dc, dc.open_session(width=SIZE, height=SIZE, fps=FPS, preset="anime") as owner:

        def feed() -> None:  # the "OBS filter": sends at FPS and reads every output
            i = 0
            while not stop.is_set():
                owner.send(synthetic_frame(i, SIZE, SIZE))
                i += 1
                deadline = time.monotonic() + 1 / FPS
                while (left := deadline - time.monotonic()) > 0:
                    got = owner.recv(timeout_s=left)
                    if got is not None:
                        received.append(got)

        thread = threading.Thread(target=feed, daemon=True)
        thread.start()
        try:
            result = CliRunner().invoke(app, ["cam", "--attach", owner.session_id, "--output", "vcam:recording",
                                              "--frames", "6", "--daemon", daemon.control_address])
            assert result.exit_code == 0, result.output
            with open_source(f"attach:{owner.session_id}", daemon=daemon.control_address) as src:
                assert src.size == (SIZE, SIZE)
                direct = src.read().pixels
        finally:
            stop.set()
            thread.join(timeout=5)
    mirrored = [f.reshape(SIZE, SIZE, 3) for f in recording_cam.instances[-1].frames]
    assert len(mirrored) == 6
    # the owner lost nothing: its outputs are consecutive
    seqs = [f.seq for f in received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and len(seqs) >= 6
    # every mirrored frame is exactly one of the owner's
    owned = np.stack([f.pixels for f in received]).astype(np.int16)
    for frame in [*mirrored, direct]:
        assert np.abs(owned - frame.astype(np.int16)).max(axis=(1, 2, 3)).min() == 0


@pytest.mark.slow
def test_attach_to_an_unknown_session_lists_the_open_ones(daemon):
    with pytest.raises(SourceError, match=r"no session .nope. on the daemon .* see `sdlive status`"):
        open_source("attach:nope", daemon=daemon.control_address)
