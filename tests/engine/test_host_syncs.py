"""HostSyncCounter: the device→host reads of engine code, counted on CPU as a CUDA run would stall on them; and what
a steady chunk of the streaming loop reads today (bench/engine.py reports ``host_syncs_per_chunk``)."""

from __future__ import annotations

import os

import numpy as np
import torch

from sdlive.daemon.engine import SessionParams, StreamEngine
from sdlive.daemon.engine.syncs import HostSyncCounter


def test_the_counter_sees_every_kind_of_read():
    x = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        x.item() if x.numel() == 1 else x[0].item()
        x.tolist()
        x.cpu()
        x.numpy()
        if x[1] > 0:  # Python control flow on a tensor
            pass
        int(x[2])
        y = x * 2  # no read
        syncs.note("synchronize")
    assert dict(syncs.by_kind) == {"item": 1, "tolist": 1, "cpu": 1, "numpy": 1, "bool": 1, "int": 1,
                                   "synchronize": 1}  # fmt: skip
    assert syncs.total == 7 and y.shape == x.shape


def test_a_steady_chunk_reads_the_sink_decision_once_per_block(tmp_path):
    """The adaptive sink check decides per block on the device and reads the decision back (one ``tolist`` per
    block and forward); the rest of a steady chunk reads one timestep label and the output pixels."""
    os.environ.setdefault("SDLIVE_PROMPT_CACHE", str(tmp_path))
    engine = StreamEngine.load("tiny", device="cpu")
    blocks = len(engine.transformer.stream_blocks)
    session = engine.open_session(width=64, height=48, params=SessionParams(prompt="a fox", steps=1))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(5 + 4 * 10)]
    for frame in frames[: 5 + 4 * 8]:
        session.push(frame)
    with HostSyncCounter() as syncs:
        for frame in frames[5 + 4 * 8 :]:
            session.push(frame)
    chunks = 2
    assert syncs.by_kind["tolist"] == blocks * chunks
    assert syncs.by_kind["item"] == chunks  # the motion-aware noise controller's timestep label
    assert syncs.by_kind["cpu"] >= chunks  # the output frames
