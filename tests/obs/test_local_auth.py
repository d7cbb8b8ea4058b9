"""Local auth with a real OBS: the test suite's daemons have local auth on (the default) and every OBS here inherits
the session's SDLIVE_SECRET_FILE, so each styled frame in tests/obs went through the script's own PLAIN handshake.
Here an OBS started with another user's secret file (what OBS run by another account would read) is refused by the
daemon: one log line and the filter's status saying the fix, the source passed through, nothing opened."""

from __future__ import annotations

import time

import pytest

from sdlive.daemon.protocol.secret import LOCAL_SECRET_ENV, ensure_local_secret

from .conftest import SOURCE_NAME, distance_to_source, start_obs

pytestmark = [pytest.mark.obs, pytest.mark.slow]

PASSTHROUGH = 3.0
STYLED = 12.0


def test_obs_with_the_secret_gets_styled_frames_from_a_local_auth_daemon(tmp_path_factory, obs_daemon):
    assert obs_daemon.request("hello")["security"] == "plain"  # the default daemon
    o = start_obs(tmp_path_factory, obs_daemon)  # inherits this session's secret file, as OBS run by you reads yours
    try:
        o.wait_for(lambda: o.filter_stats().get("frames_out", 0) > 0, 60, "styled frames from the daemon")
        assert o.filter_stats().get("state") == "connected"
        o.wait_for(lambda: distance_to_source(o.screenshot()) > STYLED, 30, "the styled output on screen")
    finally:
        o.stop()


def test_obs_with_another_users_secret_is_refused_with_one_line_naming_the_fix(tmp_path_factory, obs_daemon):
    other = tmp_path_factory.mktemp("other-user") / "sdlive" / "secret"
    ensure_local_secret(other)
    refused_before = obs_daemon.request("status")["requests"]["refused_handshakes"]
    o = start_obs(tmp_path_factory, obs_daemon, **{LOCAL_SECRET_ENV: str(other)})
    try:
        o.wait_for(lambda: "refused this user's local secret" in o.filter_stats().get("last_error", ""), 60,
                   "the filter to report the refused secret")  # fmt: skip
        time.sleep(4.0)  # a few reconnect tries: still one line
        said = [ln for ln in o.sdlive_log_lines() if "local secret" in ln]
        assert len(said) == 1, said
        assert str(other) in said[0] and "same user" in said[0] and "SDLIVE_SECRET_FILE" in said[0]
        stats = o.filter_stats()
        assert stats.get("state") == "disconnected" and stats.get("frames_out", 0) == 0
        assert distance_to_source(o.screenshot(SOURCE_NAME)) < PASSTHROUGH
        assert obs_daemon.request("status")["requests"]["refused_handshakes"] > refused_before
    finally:
        o.stop()
