"""The daemon's one config object.

Precedence (DESIGN §6): CLI flags > ``SDLIVE_*`` environment variables > the config file (TOML) > defaults.
The config file is ``--config FILE`` (or ``SDLIVE_CONFIG``), else ``user_config_dir("sdlive")/config.toml`` when it
exists. Keys in the file are the field names below (``control = "tcp://0.0.0.0:5557"``, ``token = "…"``).

No torch here: the CLI builds and validates the config before anything heavy is imported.
"""

from __future__ import annotations

import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_config_dir
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from .protocol.constants import (
    DEFAULT_CONTROL_ADDRESS,
    DEFAULT_PUB_ADDRESS,
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    is_loopback_address,
)
from .protocol.messages import summarize_validation_error

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("sdlive_config_file", default=None)


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the problem and the fix."""


def default_config_file() -> Path:
    return Path(user_config_dir("sdlive")) / "config.toml"


def parse_frame_size(text: str) -> tuple[int, int]:
    """``"512x288"`` → ``(512, 288)``; a ``ValueError`` unless both are positive multiples of 16."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{text!r} is not a size; write it as WIDTHxHEIGHT, e.g. 512x512") from None
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise ValueError(f"size {text!r}: width and height must be multiples of 16 (at least 16)")
    return width, height


class DaemonConfig(BaseSettings):
    """Everything `sdlive serve` can be told. Build it with :func:`load_config`."""

    # Field docstrings are the fields' descriptions: `sdlive serve --help` shows them (server/serve.py).
    model_config = SettingsConfigDict(
        env_prefix="SDLIVE_", extra="forbid", validate_default=True, use_attribute_docstrings=True
    )

    model: str = "auto"
    """Model name (``tiny``, ``mini``, ``wan2.1-1.3b``, ``wan2.1-14b``) or ``auto``: a real model whose weights are
    downloaded when a GPU is there, else ``mini`` (trained toy styles shipped in the package), else ``tiny``."""
    weights: Path | None = None
    """Local weights (file or folder): upstream StreamDiffusionV2's tree as it is (its root, ``ckpts/`` or
    ``wan_models/Wan2.1-T2V-1.3B/``), a diffusers folder or one checkpoint file; default: the hub cache / random
    weights for ``tiny``."""
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:1`` …; default: CUDA when available."""
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """Model dtype; default: bfloat16 on CUDA, float32 on CPU."""
    compat: Literal["upstream", "clean"] = "upstream"
    """upstream: reproduce upstream StreamDiffusionV2's behaviour, quirks included (its KV-cache bookkeeping and
    sink checks, its stream-batch warm-up, bf16 rounding of the decoder's input), which its distilled weights were
    tuned with; clean: sdlive's own rules."""
    decoder: Literal["full", "light"] = "full"
    """full: the Wan VAE's decoder; light: the TAEHV tiny decoder (taew2_1: several times faster, less memory, a
    little softer), its file from --light-decoder or beside the weights."""
    light_decoder: Path | None = None
    """The light decoder's weights (taew2_1.pth or .safetensors from github.com/madebyollin/taehv)."""
    allow_base_model: bool = False
    """Run a base Wan transformer when no StreamDiffusionV2 generator is found (it is not distilled for few-step
    streaming: blurry, slow to settle); without it that is an error naming what is missing."""
    gpus: int = Field(default=1, ge=1, le=16)
    """Devices to run on (``--device cpu``: processes on the CPU). With more than 1 the daemon starts a rank per
    device (or joins the ones ``torchrun`` started) and splits the work as ``--mode`` says."""
    mode: Literal["pipeline", "shard"] = "pipeline"
    """How ``--gpus`` N splits the work. pipeline: the transformer's blocks over the devices, every session through
    all of them (near-linear throughput for the stream batch, 2+ steps); shard: whole sessions per device, placed by
    free memory (simpler; each session as fast as on one device)."""
    rebalance: Literal["auto", "off"] = "auto"
    """Pipeline: after measuring, move blocks once from slower ranks to faster ones (auto), or keep the even split."""
    kv_cache_frames: int | None = Field(default=None, ge=1, le=1024)
    """Latent frames the DiT's rolling KV cache keeps per stream, sinks included; default: the model's (6)."""
    sink_frames: int | None = Field(default=None, ge=0, le=1023)
    """Leading cache frames that never rotate out (attention sinks), fewer than the cache frames; default: the
    model's (3)."""
    sink_threshold: float | None = Field(default=None, ge=-1, le=1)
    """Adaptive sink refresh: a new frame whose mean key/value cosine similarity to a sink is below this replaces
    the least similar sink; -1 turns it off; default: the model's (0.2)."""
    rope_refresh_frames: int | None = Field(default=None, ge=0)
    """RoPE refresh: when a stream's frame position reaches this, it restarts at cache frames - 1 (0: never; else
    more than cache frames - 1); default: the model's (50)."""
    control: str = DEFAULT_CONTROL_ADDRESS
    """ROUTER endpoint for requests. Network sessions' frame sockets bind on the same host, ephemeral ports."""
    pub: str = DEFAULT_PUB_ADDRESS
    """PUB endpoint for stats, events and the daemon heartbeat."""
    token: str | None = None
    """Shared secret every request must carry; required when any endpoint is not loopback. With a token every
    socket (control, PUB, network frames) is CurveZMQ with keys derived from it: clients need it to connect."""
    local_auth: bool = True
    """Keep other accounts on this machine out: without a token, every socket takes only clients holding the
    per-user secret in your runtime dir (created 0600 if absent; ZMTP PLAIN, loopback only), which your own clients
    and the OBS filter read by themselves."""
    max_sessions: int = Field(default=4, ge=1, le=64)
    """Most sessions at once."""
    heartbeat_interval_s: float = Field(default=HEARTBEAT_INTERVAL_S, gt=0, le=60)
    """Seconds between the daemon's heartbeats (and the interval clients are told to beat at)."""
    heartbeat_liveness: int = Field(default=HEARTBEAT_LIVENESS, ge=1, le=100)
    """A session whose client is silent for liveness × interval seconds is closed."""
    ring_slots: int = Field(default=4, ge=2, le=64)
    """Frames each shared-memory ring holds."""
    frame_memory_mb: int | None = Field(default=None, ge=16)
    """Most memory the open sessions' frames may hold at worst, all together (rings, network queues, outputs
    waiting for release), checked at open_session; default: half of this machine's (or container's) memory."""
    preset_dirs: list[Path] = Field(default_factory=list)
    """Extra preset folders (after the shipped and user presets; later folders override earlier ones)."""
    user_presets: bool = True
    """Load presets from ``user_config_dir("sdlive")/presets`` too."""
    default_preset: str | None = None
    """Preset for sessions opened without one (default: the first in sorted order)."""
    attention_backend: Literal[
        "native", "_native_flash", "_native_efficient", "_native_cudnn", "_native_math", "flex", "flash", "_flash_3",
        "sage", "xformers",
    ] = "native"
    """Attention kernel of the DiT (diffusers' dispatch): native is PyTorch's SDPA (picks flash / efficient / cuDNN
    itself); flash (flash-attn 2), _flash_3 (flash-attn 3, Hopper), sage, xformers need their package installed."""
    quantize: Literal["none", "fp8-weight", "fp8"] = "none"
    """FP8 weights for the DiT's blocks through torchao (pip install torchao): fp8-weight halves their memory on any
    GPU; fp8 also runs the matmuls in FP8 (RTX 40xx, L4, H100 and later). LoRA presets need none."""
    compile: bool = False
    """Compile the hot loop (transformer blocks, VAE) with torch.compile: faster chunks once compiled; each stream
    size compiles on its first chunks (the warm-up's size at startup: set --warmup-size to your canvas)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode with --compile: reduce-overhead also records CUDA graphs (CUDA only)."""
    warmup: bool = True
    """Run a throwaway stream through the model at startup, so the first real session does not pay the one-off
    kernel setup (seconds on CPU; with --compile, the compilation) while it is live."""
    warmup_size: str = "64x64"
    """Width x height of the warm-up stream (multiples of 16): with --compile, the size your sessions use."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """How much the daemon logs."""
    log_file: Path | None = None
    """Also log to this file."""
    ui: bool = True
    """Live stats table in the terminal (also off when stdout is not a TTY)."""
    stats_interval_s: float = Field(default=1.0, gt=0, le=60)
    """Seconds between the stats published on PUB (and the terminal table's refresh)."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("control", "pub")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not value.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(
                f"{value!r} is not a ZeroMQ endpoint; write it as tcp://HOST:PORT, e.g. {DEFAULT_CONTROL_ADDRESS}"
            )
        if value.startswith("tcp://") and ":" not in value[len("tcp://") :]:
            raise ValueError(f"{value!r} has no port; write it as tcp://HOST:PORT")
        return value

    @field_validator("warmup_size")
    @classmethod
    def _warmup_size(cls, value: str) -> str:
        parse_frame_size(value)
        return value

    @property
    def warmup_shape(self) -> tuple[int, int]:
        """``warmup_size`` as ``(width, height)``."""
        return parse_frame_size(self.warmup_size)

    @field_validator("token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _remote_needs_token(self) -> DaemonConfig:
        remote = [a for a in (self.control, self.pub) if not is_loopback_address(a)]
        if remote and not self.token:
            raise ValueError(
                f"refusing to bind {', '.join(remote)} without a token: anyone on the network could drive the daemon. "
                "Pass --token SECRET (or set SDLIVE_TOKEN) and give clients the same token, "
                "or bind to 127.0.0.1 for local use."
            )
        return self

    @model_validator(mode="after")
    def _cache_settings(self) -> DaemonConfig:
        """The cache settings together with the model's defaults make a valid ``CachePolicy`` (checked here, before
        anything loads; a name the registry does not know is left for the model load to report)."""
        from .model.configs import MODEL_SPECS, check_compat_policy

        # "auto" picks among models that share the default cache settings (tiny's, mini's, the Wan models')
        spec = MODEL_SPECS.get("tiny" if self.model == "auto" else self.model)
        if spec is not None:
            try:
                check_compat_policy(self.compat, spec.kv_cache.with_overrides(**self.cache_overrides()))
            except ValueError as exc:  # said in this config's names (the flags'), with the model's defaults
                msg = str(exc).replace("num_kv_cache", "kv_cache_frames").replace("num_sink", "sink_frames")
                raise ValueError(f"{msg} (the settings not given are {spec.name}'s defaults)") from None
        return self

    def cache_overrides(self) -> dict[str, int | float | None]:
        """The KV cache settings given (``None``: the model's default), by ``CachePolicy`` field name."""
        return {
            "num_kv_cache": self.kv_cache_frames,
            "num_sink": self.sink_frames,
            "sink_threshold": self.sink_threshold,
            "rope_refresh_frames": self.rope_refresh_frames,
        }

    @property
    def heartbeat_timeout_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness

    def secret(self) -> str | None:
        """The secret every socket is secured with: the token (CurveZMQ), else (``local_auth``) the local secret,
        created if absent (ZMTP PLAIN); None: NULL sockets. Raises ``protocol.secret.LocalSecretError`` for a secret
        file that is unusable."""
        if self.token:
            return self.token
        if self.local_auth:
            from .protocol.secret import ensure_local_secret

            return ensure_local_secret()
        return None

    @property
    def remote(self) -> bool:
        return not all(is_loopback_address(a) for a in (self.control, self.pub))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_config(config_file: Path | str | None = None, **overrides: Any) -> DaemonConfig:
    """Build the config: ``overrides`` (CLI flags; None means "not given") > env > ``config_file`` > defaults.

    Raises :class:`ConfigError` with one readable message (the file, the key and the fix) on any problem.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    explicit = config_file if config_file is not None else os.environ.get("SDLIVE_CONFIG")
    path = Path(explicit).expanduser() if explicit else default_config_file()
    if explicit and not path.is_file():
        raise ConfigError(f"config file {path} does not exist; create it or drop --config / SDLIVE_CONFIG")
    config_path: Path | None = path if path.is_file() else None
    if config_path is not None:
        try:
            tomllib.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config_path}: {exc}") from exc
    given = {k: v for k, v in overrides.items() if v is not None}
    token = _CONFIG_FILE.set(config_path)
    try:
        return DaemonConfig(**given)
    except ValidationError as exc:
        where = f" (config file {config_path})" if config_path else ""
        raise ConfigError(f"invalid configuration{where}: {summarize_validation_error(exc)}") from exc
    finally:
        _CONFIG_FILE.reset(token)
