"""HostSyncCounter: the device→host reads of engine code, counted on CPU as a CUDA run would stall on them; and what
a steady chunk of the streaming loop reads today (bench/engine.py reports ``host_syncs_per_chunk``)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sdlive.daemon.engine import SessionParams, StreamEngine
from sdlive.daemon.engine.syncs import HostSyncCounter


def test_the_counter_sees_every_kind_of_read():
    x = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        x.item() if x.numel() == 1 else x[0].item()
        x.tolist()
        x.cpu()
        x.numpy()  # not a read: numpy() takes only a CPU tensor, the read is the cpu() before it
        x.to("cpu")  # a CPU tensor already: no read
        if x[1] > 0:  # Python control flow on a tensor
            pass
        int(x[2])
        y = x * 2  # no read
        syncs.note("synchronize")
    assert dict(syncs.by_kind) == {"item": 1, "tolist": 1, "cpu": 1, "bool": 1, "int": 1, "synchronize": 1}
    assert syncs.total == 6 and y.shape == x.shape


MODES = {
    # upstream's no-batch chunk checks the sinks at every step on a queue the previous step's choice decides: one
    # read per extra step (2+ steps) remains there.
    "upstream": ((1, True), (2, True), (3, True), (1, False)),
    "clean": ((1, True), (2, True), (3, True), (1, False), (2, False), (3, False)),
}


@pytest.mark.parametrize("compat", sorted(MODES))
def test_a_steady_chunk_reads_the_device_once(tmp_path, compat):
    """Per steady chunk one device→host read: the output pixels, with the blocks' sink decisions in the same copy
    (``KVCache.pending_sink_choices``); the noise controller's level and the timestep labels stay on the device.
    upstream: stream batch at 1-3 steps and no-batch at 1 step; clean: stream batch and no-batch at 1-3 steps."""
    os.environ.setdefault("SDLIVE_PROMPT_CACHE", str(tmp_path))
    engine = StreamEngine.load("tiny", device="cpu", compat=compat)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(5 + 4 * 14)]
    for steps, stream_batch in MODES[compat]:
        session = engine.open_session(width=64, height=48, params=SessionParams(prompt="a fox", steps=steps,
                                                                                 stream_batch=stream_batch))  # fmt: skip
        for frame in frames[: 5 + 4 * 12]:  # past the fill, a sink refresh and a RoPE refresh
            session.push(frame)
        with HostSyncCounter() as syncs:
            for frame in frames[5 + 4 * 12 :]:
                session.push(frame)
        assert dict(syncs.by_kind) == {"cpu": 2}, f"steps {steps}, stream batch {stream_batch}: {dict(syncs.by_kind)}"
