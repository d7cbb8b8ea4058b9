"""Model configurations selectable by name: ``tiny``, ``mini``, ``wan2.1-1.3b``, ``wan2.1-14b``.

Each spec holds the diffusers configs of the three parts (transformer, VAE, text encoder) and the streaming defaults
of DESIGN §3. ``tiny`` has random weights made locally from a fixed seed: small enough for real time on a laptop CPU,
it serves tests, CI and benchmarks. ``mini`` is a model of tiny's size trained on a CPU and shipped in the package
(``shipped_weights``): the offline default, which visibly restyles. The Wan specs describe the real shapes; their weights come from a local path or
the hub cache (see ``sdlive.daemon.model.sources``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

# Upstream per-channel latent statistics (diffusers' AutoencoderKLWan defaults, = Wan2.1_VAE).
WAN_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

_WAN_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "latents_mean": WAN_LATENTS_MEAN,
    "latents_std": WAN_LATENTS_STD,
}
# What every Wan2.1 T2V transformer shares (sizes: heads, text_dim, freq_dim, ffn_dim, num_layers, per spec).
_WAN_DIT: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
# What every UMT5 text encoder here shares (sizes: d_model, d_kv, d_ff, num_layers, num_heads, per spec).
_UMT5: dict[str, Any] = {
    "vocab_size": 256384,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_encoder_decoder": False,
}


@dataclass(frozen=True)
class CachePolicy:
    """What the DiT's rolling KV cache keeps (``kv_cache.KVCache``); the defaults are DESIGN §3's (= upstream's).

    ``num_kv_cache``: latent frames kept per batch slot, sinks included. ``num_sink``: leading frames that never
    rotate out (except by the sink refresh). ``sink_threshold``: sink refresh threshold on the mean cosine
    similarity; ``-1`` disables it. ``rope_refresh_frames``: when the next chunk's position reaches this, it is reset
    to ``num_kv_cache - 1``; ``0`` disables the reset.
    """

    num_kv_cache: int = 6
    num_sink: int = 3
    sink_threshold: float = 0.2
    rope_refresh_frames: int = 50

    def __post_init__(self) -> None:
        for name in ("num_kv_cache", "num_sink", "rope_refresh_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if isinstance(self.sink_threshold, bool) or not isinstance(self.sink_threshold, (int, float)):
            raise ValueError(f"sink_threshold must be a number, got {self.sink_threshold!r}")
        if not -1 <= self.sink_threshold <= 1:
            raise ValueError(f"sink_threshold must be a cosine similarity in [-1, 1] (-1: off), got {self.sink_threshold}")
        if self.num_kv_cache < 1:
            raise ValueError(f"num_kv_cache must be >= 1, got {self.num_kv_cache}")
        if not 0 <= self.num_sink < self.num_kv_cache:
            raise ValueError(
                f"num_sink must be in [0, num_kv_cache), got {self.num_sink} with num_kv_cache={self.num_kv_cache}"
            )
        if self.rope_refresh_frames < 0 or (0 < self.rope_refresh_frames <= self.num_kv_cache - 1):
            raise ValueError(
                f"rope_refresh_frames must be 0 (off) or > num_kv_cache - 1 = {self.num_kv_cache - 1}, "
                f"got {self.rope_refresh_frames}"
            )

    def with_overrides(self, **overrides: Any) -> CachePolicy:
        """This policy with the given fields changed (``None`` values ignored), validated as a whole; an unknown
        field name is a ``ValueError`` listing the known ones."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown cache setting(s) {', '.join(unknown)}: expected {', '.join(sorted(known))}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **given) if given else self


DEFAULT_CACHE_POLICY = CachePolicy()


Compat = Literal["upstream", "clean"]
"""Which of two behaviours to run where sdlive could either match a quirk of upstream StreamDiffusionV2 or not."""

COMPAT_MODES: tuple[Compat, ...] = ("upstream", "clean")
DEFAULT_COMPAT: Compat = "upstream"


def check_compat(value: object) -> Compat:
    """``value`` as a :data:`Compat` mode; a ``ValueError`` naming both modes otherwise.

    ``"upstream"`` (the default) reproduces upstream StreamDiffusionV2 where it behaves oddly, because the distilled
    generators (``wan_causal_dmd_v2v``, ``…_14b``) were tuned and evaluated with upstream's behaviour, so its output
    is what they are known to give:

    * the KV cache's bookkeeping is upstream's own (``KVCache``): the adaptive sink check runs on every write (the
      fill phase, no-batch mode's repeated steps and stream-batch warm-up fillers included, in the cache dtype); a
      sink frame that is still empty has similarity 0, so it is queued and overwritten by the first full-cache
      write; the ring registers each slot one chunk ahead, which after the 2-frame first chunk skips frame slots 1
      and 2 (non-sinks among them, ``num_sink <= 2``, are never overwritten; this needs ``num_kv_cache >= 4``,
      :func:`check_compat_policy`); a batch-1 cache's full-phase writes pop the queue every ``steps`` writes;
    * the stream batch runs every slot from its first call, the empty ones on zeroed fillers (``StreamSession``);
    * the decoder's input latent is rounded to bf16, even in an fp32 run, and un-normalised as z / (1/std) + mean
      (``StreamingVAE.unnormalize``).

    ``"clean"`` is sdlive's own rule: one sink decision per chunk and only once the cache is full, every non-sink
    frame in the round robin, only occupied stream-batch slots run, fp32 latents into the decoder (z·std+mean).
    See "Where sdlive differs from upstream" in ``docs/architecture.md``.
    """
    if isinstance(value, str) and value in COMPAT_MODES:
        return value
    raise ValueError(f"compat must be one of {', '.join(repr(m) for m in COMPAT_MODES)}, got {value!r}")


def check_compat_policy(compat: Compat, policy: CachePolicy) -> None:
    """A ``ValueError`` for a cache that cannot stream in ``compat`` mode.

    ``"upstream"`` keeps upstream's ring, which after the 2-frame first chunk never holds frame slots 1 and 2: with
    ``num_kv_cache = 3`` it holds nothing and the first full-cache write has no slot to overwrite (upstream fails
    there with an IndexError).
    """
    if compat == "upstream" and policy.num_kv_cache < 4:
        raise ValueError(
            f"num_kv_cache={policy.num_kv_cache} cannot stream with compat='upstream': upstream's ring never holds "
            "frame slots 1-2, so it needs num_kv_cache >= 4 (upstream itself fails at the first full-cache write); "
            "use more cache frames or compat='clean'"
        )


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build (or find the weights of) one model family member."""

    name: str
    transformer: dict[str, Any]
    """kwargs of ``WanTransformer3DModel`` (names identical to diffusers)."""
    vae: dict[str, Any]
    """kwargs of ``AutoencoderKLWan``."""
    text_encoder: dict[str, Any]
    """kwargs of ``transformers.UMT5Config`` (the encoder part is used)."""
    text_len: int = 512
    default_steps: int = 2
    noise_scale: float = 0.8
    kv_cache: CachePolicy = DEFAULT_CACHE_POLICY
    """What the DiT's rolling KV cache keeps (DESIGN §3 defaults)."""
    random_weights: bool = False
    """True for ``tiny``: weights are made from ``seed``, nothing is loaded."""
    seed: int = 0
    hub_repo: str | None = None
    """Hub repo of the diffusers-format base model (transformer/, vae/, text_encoder/, tokenizer/)."""
    generator_repo: str | None = None
    generator_file: str | None = None
    """StreamDiffusionV2 distilled generator (original Wan key names) that overrides the base transformer."""
    estimated_vram_gb: float = 0.0
    shipped_weights: str | None = None
    """Weights inside the package (a folder under ``sdlive/daemon/model/``: ``transformer.safetensors``,
    ``vae.safetensors``, ``prompts.safetensors``), for ``mini``; nothing to download."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text_dim(self) -> int:
        return int(self.transformer["text_dim"])


# `tiny` keeps the real model's cost shape at toy size: head_dim 128 (so RoPE splits 44/42/42 as in Wan2.1), ffn ≈ 6×dim,
# and a DiT that outweighs the VAE per chunk as on the real model, so the benchmark ratios (recompute, stream batch)
# measure the design rather than a DiT too small to matter. About 25–35 FPS at 256×256 on a 2-core CPU.
TINY = ModelSpec(
    name="tiny",
    transformer={**_WAN_DIT, "num_attention_heads": 2, "text_dim": 64, "freq_dim": 64, "ffn_dim": 1536, "num_layers": 4},
    vae={**_WAN_VAE, "base_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1},
    text_encoder={**_UMT5, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
    default_steps=2,
    random_weights=True,
    seed=0,
)

# `mini` is tiny's size class trained here on a CPU (tools/train_mini.py, docs/mini.md): the same Wan DiT family at
# dim 256 (2 heads x 128, so RoPE splits as in Wan2.1), 4 layers, and a Wan2.2-style residual VAE (2x2 patchify, base
# width 16, x8 in space and x4 in time like Wan2.1's, so the DiT's latents are the same shape). Its "text encoder" is a
# table of learned prompt embeddings, one per style (text_len 4 rows of text_dim 64): only its own prompts
# (mini_styles.MINI_STYLES) are known. Shipped in the package: a 19 MB DiT, a 2.8 MB VAE, 7 KB of prompts.
MINI = ModelSpec(
    name="mini",
    transformer={**_WAN_DIT, "num_attention_heads": 2, "text_dim": 64, "freq_dim": 64, "ffn_dim": 1024, "num_layers": 4},
    vae={
        **_WAN_VAE, "base_dim": 16, "dim_mult": [1, 2, 2], "num_res_blocks": 1, "temperal_downsample": [True, True],
        "is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12,
        "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16,
    },  # fmt: skip
    text_encoder={},
    text_len=4,
    default_steps=1,
    noise_scale=0.6,
    shipped_weights="weights/mini",
)

WAN_1_3B = ModelSpec(
    name="wan2.1-1.3b",
    transformer={
        **_WAN_DIT, "num_attention_heads": 12, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
    },  # fmt: skip
    vae=_WAN_VAE,
    text_encoder={**_UMT5, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64},
    default_steps=2,
    hub_repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    generator_repo="jerryfeng/StreamDiffusionV2",
    generator_file="wan_causal_dmd_v2v/model.pt",
    estimated_vram_gb=20.0,
)

WAN_14B = ModelSpec(
    name="wan2.1-14b",
    transformer={**WAN_1_3B.transformer, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
    vae=_WAN_VAE,
    text_encoder=WAN_1_3B.text_encoder,
    default_steps=1,
    hub_repo="Wan-AI/Wan2.1-T2V-14B-Diffusers",
    generator_repo="jerryfeng/StreamDiffusionV2",
    generator_file="wan_causal_dmd_v2v_14b/model.pt",
    estimated_vram_gb=60.0,
)

MODEL_SPECS: dict[str, ModelSpec] = {s.name: s for s in (TINY, MINI, WAN_1_3B, WAN_14B)}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_SPECS)


def get_model_spec(name: str | ModelSpec) -> ModelSpec:
    """The spec called ``name`` (a ``ModelSpec`` is returned as it is, so one is accepted wherever a name is); a
    clear ``ValueError`` listing the known names otherwise."""
    if isinstance(name, ModelSpec):
        return name
    if not isinstance(name, str):
        raise ValueError(f"a model is a name ({', '.join(MODEL_NAMES)}) or a ModelSpec, got {type(name).__name__}")
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}") from None
