"""The engine's seam: StreamEngine and StreamSession are what the daemon sees them as (``interface.Engine`` and
``EngineSession``; mypy checks the signatures, this checks the members at run time), and the stage timings are the
plain dict the stats and the wire carry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdlive.daemon.engine import Engine, EngineSession, OutputFrame, StageTimes, StreamEngine


@pytest.fixture(scope="module")
def engine() -> StreamEngine:
    return StreamEngine.load("tiny", device="cpu")


def test_the_engine_and_its_sessions_implement_the_protocols(engine):
    assert isinstance(engine, Engine)
    session = engine.open_session(width=32, height=32)
    assert isinstance(session, EngineSession)
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    out = [o for f in frames for o in session.push(f)] + session.flush()
    assert [o.index for o in out] == list(range(5)) and all(isinstance(o, OutputFrame) for o in out)
    assert isinstance(session.stage_ms, StageTimes) and session.stage_ms.dit == session.stage_ms["dit"] > 0


def test_stage_times_are_a_plain_dict_of_the_three_stages():
    times = StageTimes(encode=1.0, dit=2.5, decode=3.0)
    assert times == {"encode": 1.0, "dit": 2.5, "decode": 3.0}
    assert (times.encode, times.dit, times.decode) == (1.0, 2.5, 3.0)
    assert json.loads(json.dumps(times)) == times
    assert StageTimes() == {"encode": 0.0, "dit": 0.0, "decode": 0.0}
