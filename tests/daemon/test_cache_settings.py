"""The engine settings given to `sdlive serve` (KV cache, compat, attention kernel) reach the engine and are shown by
`hello` and `status`."""

from __future__ import annotations


def test_serve_cache_flags_are_shown_by_hello_and_status(daemon_factory):
    proc = daemon_factory(
        "--kv-cache-frames", "8", "--sink-frames", "2", "--sink-threshold", "-1", "--compat", "clean", "--no-warmup",
        "--attention-backend", "_native_math",
    )  # fmt: skip
    want = {"num_kv_cache": 8, "num_sink": 2, "sink_threshold": -1.0, "rope_refresh_frames": 50}
    with proc.client() as client:
        assert client.hello().cache.model_dump() == want
        assert client.status().cache.model_dump() == want
        assert client.hello().compat == client.status().compat == "clean"  # the flag reached the engine
        accelerated = "attention _native_math"  # read back from the engine's own modules
        assert client.hello().acceleration == client.status().acceleration == accelerated


def test_a_default_daemon_says_nothing_is_accelerated(daemon):
    with daemon.client() as client:
        assert client.hello().acceleration is None


def test_a_bad_cache_combination_stops_serve_before_loading(capsys):
    from sdlive.daemon.server.serve import main

    assert main(["--sink-frames", "6", "--no-ui"]) == 2
    err = capsys.readouterr().err
    assert "sink_frames must be in [0, kv_cache_frames)" in err
