"""The daemon's one config object: CLI flags > SDLIVE_* env > config file > defaults; unsafe binds refused."""

from __future__ import annotations

import pytest

from sdlive.daemon.config import ConfigError, DaemonConfig, load_config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("SDLIVE_CONFIG", "SDLIVE_TOKEN", "SDLIVE_MAX_SESSIONS", "SDLIVE_CONTROL", "SDLIVE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-user-config"))


def test_defaults_are_loopback_auto_model_and_no_token():
    cfg = load_config()
    assert cfg.model == "auto"  # serve picks: downloaded weights on a GPU, else the shipped mini, else tiny
    assert cfg.control == "tcp://127.0.0.1:5557" and cfg.pub == "tcp://127.0.0.1:5558"
    assert cfg.token is None and not cfg.remote
    assert cfg.heartbeat_timeout_s == pytest.approx(3.0)


def test_precedence_cli_over_env_over_file_over_default(tmp_path, monkeypatch):
    file = tmp_path / "sdlive.toml"
    file.write_text('max_sessions = 7\nmodel = "wan2.1-1.3b"\nlog_level = "debug"\n')
    assert load_config(file).max_sessions == 7
    assert load_config(file).log_level == "DEBUG"
    monkeypatch.setenv("SDLIVE_MAX_SESSIONS", "9")
    cfg = load_config(file)
    assert cfg.max_sessions == 9 and cfg.model == "wan2.1-1.3b"
    assert load_config(file, max_sessions=2).max_sessions == 2
    assert load_config(file, max_sessions=None).max_sessions == 9  # a flag not given does not override


def test_config_file_from_env_variable(tmp_path, monkeypatch):
    file = tmp_path / "c.toml"
    file.write_text("heartbeat_liveness = 5\n")
    monkeypatch.setenv("SDLIVE_CONFIG", str(file))
    assert load_config().heartbeat_liveness == 5


@pytest.mark.parametrize(
    ("text", "needle"),
    [("bogus = 1\n", "bogus"), ("max_sessions = 0\n", "max_sessions"), ("max_sessions = \n", "config file"),
     ('control = "localhost:5557"\n', "tcp://HOST:PORT")],
)
def test_bad_config_file_is_a_clear_error(tmp_path, text, needle):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(file)
    assert needle in str(err.value) and str(file) in str(err.value)


def test_missing_explicit_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:5557", "tcp://*:5557", "tcp://192.168.1.20:5557"])
def test_non_loopback_bind_needs_a_token(address):
    with pytest.raises(ConfigError, match="without a token"):
        load_config(control=address)
    assert load_config(control=address, token="t").remote


def test_a_host_name_other_than_localhost_is_remote_even_when_it_resolves_to_loopback():
    """One loopback rule (protocol.constants.is_loopback_address), no DNS: a name can change what it points at."""
    with pytest.raises(ConfigError, match="without a token"):
        load_config(control="tcp://ip6-localhost:5557")
    assert not load_config(control="tcp://localhost:5557").remote


def test_config_is_one_pydantic_settings_object():
    assert isinstance(load_config(), DaemonConfig)


def test_cache_settings_default_to_the_model_and_are_flags(monkeypatch):
    from sdlive.daemon.server.serve import build_parser

    assert load_config().cache_overrides() == {
        "num_kv_cache": None, "num_sink": None, "sink_threshold": None, "rope_refresh_frames": None,
    }  # fmt: skip
    args = vars(build_parser().parse_args(
        ["--kv-cache-frames", "8", "--sink-frames", "2", "--sink-threshold", "-1", "--rope-refresh-frames", "0",
         "--allow-base-model"]
    ))  # fmt: skip
    args.pop("config")
    cfg = load_config(**args)
    assert cfg.cache_overrides() == {"num_kv_cache": 8, "num_sink": 2, "sink_threshold": -1, "rope_refresh_frames": 0}
    assert cfg.allow_base_model and not load_config().allow_base_model
    monkeypatch.setenv("SDLIVE_SINK_FRAMES", "1")
    assert load_config().sink_frames == 1
    help_text = " ".join(build_parser().format_help().split())
    assert "--kv-cache-frames" in help_text and "attention sinks" in help_text


@pytest.mark.parametrize(
    ("settings", "needle"),
    [({"sink_frames": 6}, r"sink_frames must be in \[0, kv_cache_frames\).*tiny's defaults"),
     ({"kv_cache_frames": 4, "sink_frames": 4}, "sink_frames must be in"),
     ({"kv_cache_frames": 0}, "kv_cache_frames"),
     ({"rope_refresh_frames": 3}, "rope_refresh_frames must be 0"),
     ({"sink_threshold": 1.5}, "sink_threshold")],
)  # fmt: skip
def test_bad_cache_settings_are_config_errors(settings, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(**settings)


def test_compat_defaults_to_upstream_is_a_flag_and_is_checked_with_the_cache(monkeypatch):
    from sdlive.daemon.server.serve import build_parser

    assert load_config().compat == "upstream"  # the distilled weights' behaviour is the default
    args = vars(build_parser().parse_args(["--compat", "clean"]))
    args.pop("config")
    assert load_config(**args).compat == "clean"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--compat", "sideways"])
    with pytest.raises(ConfigError, match="compat='upstream'"):  # upstream's ring needs 4 cache frames
        load_config(kv_cache_frames=3, sink_frames=1)
    assert load_config(kv_cache_frames=3, sink_frames=1, compat="clean").kv_cache_frames == 3
    monkeypatch.setenv("SDLIVE_COMPAT", "clean")
    assert load_config().compat == "clean"


def test_local_auth_is_on_by_default_with_flags_both_ways_env_and_the_relays_opt_out(monkeypatch):
    from sdlive.daemon.relay.main import build_parser as relay_parser
    from sdlive.daemon.server.serve import build_parser

    assert load_config().local_auth is True
    for argv, expected in (([], True), (["--no-local-auth"], False), (["--local-auth"], True)):
        args = vars(build_parser().parse_args(argv))
        args.pop("config")
        assert load_config(**args).local_auth is expected, argv
    assert "--no-local-auth" in " ".join(build_parser().format_help().split())
    assert relay_parser().parse_args(["--daemon", "tcp://gpu:5557", "--no-local-auth"]).local_auth is False
    assert relay_parser().parse_args(["--daemon", "tcp://gpu:5557"]).local_auth is None  # the config's default
    monkeypatch.setenv("SDLIVE_LOCAL_AUTH", "false")
    assert load_config().local_auth is False
