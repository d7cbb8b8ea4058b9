"""A model ready for the engine (``ModelBundle``): its transformer and VAE built from checkpoints or from the spec's
seed, and its cached prompt encoder (``load_model_bundle``).

- ``tiny`` (``spec.random_weights``): random weights from the spec's seed (deterministic; nothing is read), unless
  ``weights=`` gives trained parts of the same shapes.
- ``mini`` (``spec.shipped_weights``): the safetensors inside the package (``weights/mini/``), or the same three
  files in ``weights=`` (a retrained export); its prompts come from a table (``mini.PromptTable``), no text encoder.
- real models: the files ``sources.locate_weights`` finds (``weights=`` first, then the hub cache), in any format
  ``formats`` converts. Models are built without storage and the checkpoint is assigned in.

Anything missing or wrong is one :class:`~.errors.CheckpointError` naming the file, what was expected and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.modeling_utils import no_init_weights

from .causal_wan import CausalWanTransformer3DModel
from .configs import DEFAULT_COMPAT, Compat, ModelSpec, get_model_spec
from .errors import CheckpointError, pull_hint
from .formats import (
    StateDict,
    convert_text_encoder_state_dict,
    convert_transformer_state_dict,
    convert_vae_state_dict,
    read_checkpoint,
)
from .hub import HubCacheDir
from .mini import PROMPTS_FILE, TRANSFORMER_FILE, VAE_FILE, PromptTable, shipped_weights_dir
from .sources import ORIGINAL_VAE_FILE, WeightSources, locate_weights
from .taehv import LIGHT_DECODER_FILES, TinyWanDecoder, load_tiny_decoder
from .text import PromptEncoder, TextEncoder
from .vae import StreamingVAE

__all__ = ["ModelBundle", "ProgressFn", "load_model_bundle", "load_text_encoder", "load_transformer", "load_vae"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str], None]
"""Gets one line per loading stage."""

_Module = TypeVar("_Module", bound=torch.nn.Module)


@dataclass
class ModelBundle:
    """A model ready for the engine: the causal DiT, the VAE weights (one ``StreamingVAE`` per session over them,
    see ``new_vae``) and the cached prompt encoder."""

    spec: ModelSpec
    transformer: CausalWanTransformer3DModel
    vae: AutoencoderKLWan
    text: PromptEncoder | PromptTable
    """Prompt → embedding: the cached text encoder, or (``mini``) the table of the model's own prompts."""
    sources: dict[str, str] = field(default_factory=dict)
    """Where each part came from (for logs and ``status``)."""
    light_decoder: TinyWanDecoder | None = None
    """The light decoder sessions decode with instead of the Wan VAE's (``--decoder light``), or None."""

    def new_vae(self, *, normalize_latents: bool = False, compat: Compat = DEFAULT_COMPAT) -> StreamingVAE:
        """A ``StreamingVAE`` over these weights; ``compat="upstream"`` rounds decoder input latents to bf16."""
        return StreamingVAE(self.vae, normalize_latents=normalize_latents, compat=compat,
                            light_decoder=self.light_decoder)  # fmt: skip


def find_light_decoder(weights: str | Path | None) -> Path | None:
    """A ``taew2_1`` file next to the model's weights: in ``weights``, its ``ckpts/`` (upstream's tree keeps it
    there) or the folder above; None when there is none."""
    if weights is None:
        return None
    root = Path(weights).expanduser()
    folders = [root, root / "ckpts", root.parent, root.parent / "ckpts"] if root.is_dir() else [root.parent]
    for folder in folders:
        for name in LIGHT_DECODER_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def light_decoder_for(
    spec: ModelSpec, path: str | Path | None, weights: str | Path | None, *, device: torch.device, dtype: torch.dtype
) -> tuple[TinyWanDecoder, str]:
    """The light decoder for ``spec`` and where it came from: ``path``, else a ``taew2_1`` file beside ``weights``,
    else (``tiny``) random weights from the spec's seed; otherwise a :class:`CheckpointError` saying where to get it."""
    found = Path(path).expanduser() if path is not None else find_light_decoder(weights)
    if found is not None:
        if not found.is_file():
            raise CheckpointError(f"light decoder {found} not found: {_LIGHT_HINT}")
        try:
            return load_tiny_decoder(found, device=device, dtype=dtype), str(found)
        except (ValueError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"cannot load the light decoder {found}: {exc}") from None
    if spec.random_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed + 1)
            decoder = TinyWanDecoder()
        return decoder.to(device=device, dtype=dtype).eval().requires_grad_(False), f"random (seed {spec.seed + 1})"
    raise CheckpointError(f"--decoder light needs a taew2_1 file and none was found beside the weights: {_LIGHT_HINT}")


_LIGHT_HINT = (
    "download https://github.com/madebyollin/taehv/raw/main/taew2_1.pth into the weights folder (or its ckpts/) "
    "or pass --light-decoder PATH"
)


# --------------------------------------------------------------------------------------------- building models
def _for_inference(model: _Module, device: str | torch.device, dtype: torch.dtype) -> _Module:
    """``model`` in eval mode without gradients on ``device``, its parameters cast to ``dtype`` and its
    ``_keep_in_fp32_modules`` to float32, buffers (RoPE tables) left as built: the rule diffusers'
    ``from_pretrained(torch_dtype=...)`` applies."""
    model.eval().requires_grad_(False)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    model.to(device=device)
    for name, param in model.named_parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def _load_strict(model: torch.nn.Module, state: StateDict, *, what: str, source: str, spec: ModelSpec) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} != {tuple(expected[k].shape)})"
            )
        raise CheckpointError(
            f"{source} is not a {spec.name} {what}: {'; '.join(parts)}. Expected the {spec.name} shapes "
            f"({_shape_summary(spec, what)}); {pull_hint(spec)}"
        )
    # assign: the checkpoint's tensors become the parameters (the model was built without storage).
    model.load_state_dict(state, strict=True, assign=True)


def _shape_summary(spec: ModelSpec, what: str) -> str:
    if what == "transformer":
        t = spec.transformer
        return f"{t['num_layers']} layers, dim {t['num_attention_heads'] * t['attention_head_dim']}, ffn {t['ffn_dim']}"
    if what == "text encoder":
        c = spec.text_encoder
        return f"{c['num_layers']} layers, d_model {c['d_model']}, d_ff {c['d_ff']}, vocab {c['vocab_size']}"
    v = spec.vae
    return f"base_dim {v['base_dim']}, z_dim {v['z_dim']}, dim_mult {v['dim_mult']}, {v['num_res_blocks']} res blocks"


def _empty_weights() -> AbstractContextManager[None]:
    """Build a model whose parameters have no storage (meta), buffers real: the checkpoint is assigned in, so a 14B
    model never exists twice in RAM nor spends minutes on a random init. accelerate's ``init_empty_weights``
    (what diffusers' ``from_pretrained`` uses); without accelerate, diffusers' ``no_init_weights`` (skip init only)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return no_init_weights()
    return init_empty_weights(include_buffers=False)


def _read(state_or_path: StateDict | str | Path) -> tuple[StateDict, str]:
    """The state dict and the name to use for it in errors."""
    if isinstance(state_or_path, dict):
        return state_or_path, "<state dict>"
    return read_checkpoint(state_or_path), str(state_or_path)


def load_transformer(
    spec: ModelSpec,
    state_or_path: StateDict | str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    base: str | Path | None = None,
) -> CausalWanTransformer3DModel:
    """``CausalWanTransformer3DModel`` of ``spec`` from any supported transformer checkpoint (file, sharded index or
    state dict). ``base``: a base-model checkpoint read only if the first lacks keys (a partial generator)."""
    raw, source = _read(state_or_path)
    state = convert_transformer_state_dict(raw, source=source)
    with _empty_weights():
        model = CausalWanTransformer3DModel(**spec.transformer)
    missing = set(model.state_dict()) - set(state)
    if base is not None and missing:
        logger.info("%s lacks %d keys; taking them from the base model %s", source, len(missing), base)
        base_state = convert_transformer_state_dict(read_checkpoint(base), source=str(base))
        state = {**{k: v for k, v in base_state.items() if k in missing}, **state}
    _load_strict(model, state, what="transformer", source=source, spec=spec)
    return _for_inference(model, device, dtype)


def load_vae(
    spec: ModelSpec,
    state_or_path: StateDict | str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKLWan:
    """``AutoencoderKLWan`` of ``spec`` from an original ``Wan2.1_VAE.pth`` or a diffusers VAE checkpoint."""
    raw, source = _read(state_or_path)
    state = convert_vae_state_dict(raw, source=source)
    with _empty_weights():
        model = AutoencoderKLWan(**spec.vae)
    _load_strict(model, state, what="VAE", source=source, spec=spec)
    return _for_inference(model, device, dtype)


def load_text_encoder(
    spec: ModelSpec,
    state_or_path: StateDict | str | Path,
    tokenizer: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextEncoder:
    """The ``TextEncoder`` of ``spec`` from a UMT5 encoder checkpoint in Wan's own format (upstream's
    ``models_t5_umt5-xxl-enc-bf16.pth``) or transformers' keys, and a Hugging Face tokenizer folder (Wan's
    ``google/umt5-xxl/``)."""
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    raw, source = _read(state_or_path)
    state = convert_text_encoder_state_dict(raw, source=source)
    with _empty_weights():
        model = UMT5EncoderModel(UMT5Config(**spec.text_encoder))
    _load_strict(model, state, what="text encoder", source=source, spec=spec)
    model.tie_weights()  # one tensor behind shared / embed_tokens, as from_pretrained leaves it
    try:
        tok = AutoTokenizer.from_pretrained(Path(tokenizer))
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure is the same user-facing problem
        raise CheckpointError(
            f"cannot load the {spec.name} tokenizer from {tokenizer}: {type(exc).__name__}: {exc}. Expected a "
            f"Hugging Face tokenizer folder (upstream's Wan folder has it as google/umt5-xxl/); {pull_hint(spec)}"
        ) from exc
    return TextEncoder(_for_inference(model, device, dtype), tok, text_len=spec.text_len)


# --------------------------------------------------------------------------------------------- the bundle
def _random_bundle(
    spec: ModelSpec, device: str | torch.device, dtype: torch.dtype, cache_dir: str | Path | None
) -> ModelBundle:
    with torch.random.fork_rng(devices=[]):  # deterministic, and the caller's RNG is left alone
        torch.manual_seed(spec.seed)
        transformer = CausalWanTransformer3DModel(**spec.transformer)
        vae = AutoencoderKLWan(**spec.vae)
    seeded = f"random (seed {spec.seed})"
    return ModelBundle(
        spec=spec,
        transformer=_for_inference(transformer, device, dtype),
        vae=_for_inference(vae, device, dtype),
        text=PromptEncoder.for_spec(spec, device=device, dtype=torch.float32, cache_dir=cache_dir),
        sources={"transformer": seeded, "vae": seeded, "text_encoder": seeded},
    )


def _shipped_bundle(
    spec: ModelSpec, weights: str | Path | None, device: str | torch.device, dtype: torch.dtype, say: ProgressFn
) -> ModelBundle:
    """``mini``: its transformer, VAE and prompt table from the package (or from ``weights``, a folder holding the
    same three files, e.g. a fresh ``tools/train_mini.py`` export)."""
    if weights is None:
        folder = shipped_weights_dir(spec)
    else:
        folder = Path(weights).expanduser()
        missing = [n for n in (TRANSFORMER_FILE, VAE_FILE, PROMPTS_FILE) if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder} is not a {spec.name} weights folder: missing {', '.join(missing)} (expected "
                f"{TRANSFORMER_FILE}, {VAE_FILE}, {PROMPTS_FILE}, as tools/train_mini.py exports them); without "
                f"--weights the {spec.name} weights inside the package are used"
            )
    say(f"loading the {spec.name} model from {folder}")
    transformer = load_transformer(spec, folder / TRANSFORMER_FILE, device=device, dtype=dtype)
    vae = load_vae(spec, folder / VAE_FILE, device=device, dtype=dtype)
    table = PromptTable.from_file(spec.name, folder / PROMPTS_FILE)
    if (table.text_len, table.text_dim) != (spec.text_len, spec.text_dim):
        raise CheckpointError(
            f"{folder / PROMPTS_FILE} holds [{table.text_len}, {table.text_dim}] prompt embeddings, the {spec.name} "
            f"transformer takes [{spec.text_len}, {spec.text_dim}]"
        )
    where = str(folder)
    return ModelBundle(spec=spec, transformer=transformer, vae=vae, text=table,
                       sources={"transformer": where, "vae": where, "text_encoder": f"prompt table ({where})"})  # fmt: skip


def _no_generator(spec: ModelSpec, src: WeightSources, weights: str | Path | None) -> CheckpointError:
    """Only a base transformer was found: what was found, what is missing, and the two fixes."""
    found = [f"the base transformer {src.base_transformer}"]
    if src.vae is not None:
        found.append(f"the VAE {src.vae}")
    if src.text_root is not None or src.text_encoder is not None:
        found.append(f"the text encoder {src.text_encoder or src.text_root}")
    where = f" in {weights} or" if weights else ""
    return CheckpointError(
        f"{spec.name}: found {', '.join(found)}, but no StreamDiffusionV2 generator (looked for "
        f"{spec.generator_file or 'model.pt'}{where} the hub cache {spec.generator_repo}; upstream keeps it in "
        f"ckpts/{spec.generator_file or 'model.pt'}). The base model is not distilled for few-step streaming. Fix: "
        f"pass the upstream root (holding wan_models/ and ckpts/) or the generator's folder as --weights, "
        f"{pull_hint(spec)}; or pass --allow-base-model (base_only=True) to run the base transformer anyway"
    )


def text_encoder_device(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> torch.device:
    """Where the text encoder runs for a cache miss: the model's GPU when its weights fit in the free memory there
    beside the sessions (with 10 % to spare), else the CPU (slower, but never an out-of-memory error)."""
    if device.type != "cuda":
        return device
    from .memory import free_device_bytes, model_memory

    need = model_memory(spec, dtype).text_encoder * 1.1
    free = free_device_bytes(device) or 0
    if free >= need:
        return device
    logger.info("the %s text encoder (%.1f GiB) does not fit beside the sessions (%.1f GiB free): encoding on the CPU",
                spec.name, need / 1024**3, free / 1024**3)  # fmt: skip
    return torch.device("cpu")


def load_model_bundle(
    name: str | ModelSpec,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    hub_cache_dir: HubCacheDir = None,
    base_only: bool = False,
) -> ModelBundle:
    """Build the model ``name`` (a registered name or a ``ModelSpec``) on ``device`` in ``dtype``.

    ``tiny`` (``spec.random_weights``) is made from its seed. Real models load from ``weights`` and/or the hub cache
    (``sources``); nothing is downloaded. ``cache_dir``: the prompt embedding cache (default: the user cache).
    ``hub_cache_dir``: the huggingface_hub cache (default: ``HF_HUB_CACHE``). ``progress`` gets one line per stage.
    ``base_only=True``: run the base Wan transformer when no StreamDiffusionV2 generator is found (an explicit
    choice: it is not distilled for few-step streaming); otherwise that is a :class:`CheckpointError`.
    """
    spec = name if isinstance(name, ModelSpec) else get_model_spec(name)
    say: ProgressFn = progress or (lambda msg: None)
    if spec.random_weights:
        say(f"building {spec.name} from seed {spec.seed}")
        bundle = _random_bundle(spec, device, dtype, cache_dir)
        if weights is not None:  # trained weights of the same shapes override the seeded ones, part by part
            src = locate_weights(spec, Path(weights), hub_cache_dir)
            trained = src.transformer or src.base_transformer
            if trained is not None:
                say(f"loading the {spec.name} transformer from {trained}")
                bundle.transformer = load_transformer(spec, trained, device=device, dtype=dtype)
                bundle.sources["transformer"] = str(trained)
            if src.vae is not None:
                say(f"loading the {spec.name} VAE from {src.vae}")
                bundle.vae = load_vae(spec, src.vae, device=device, dtype=dtype)
                bundle.sources["vae"] = str(src.vae)
        return bundle

    if spec.shipped_weights is not None:
        return _shipped_bundle(spec, weights, device, dtype, say)

    def not_found(part: str, in_hub: str, in_weights: str, note: str = "") -> CheckpointError:
        given = f" or {in_weights}in {weights}" if weights else ""
        return CheckpointError(
            f"the {spec.name} {part} was not found: expected {in_hub} in the hub cache{given}{note}; {pull_hint(spec)}"
        )

    src = locate_weights(spec, Path(weights) if weights is not None else None, hub_cache_dir)
    main = src.transformer or src.base_transformer
    if main is None:
        raise not_found(
            "transformer", f"the StreamDiffusionV2 generator {spec.generator_repo}/{spec.generator_file}", "weights "
        )
    if src.transformer is None:
        if not base_only:
            raise _no_generator(spec, src, weights)
        logger.warning(
            "%s: no StreamDiffusionV2 generator, running the base transformer %s as asked (--allow-base-model; not "
            "distilled for few-step streaming)",
            spec.name,
            src.base_transformer,
        )
    if src.vae is None:
        raise not_found("VAE", f"vae/diffusion_pytorch_model.safetensors of {spec.hub_repo}", f"{ORIGINAL_VAE_FILE} / vae/ ")

    base = src.base_transformer if src.transformer is not None else None
    say(f"loading the {spec.name} transformer from {main}")
    transformer = load_transformer(spec, main, device=device, dtype=dtype, base=base)
    say(f"loading the {spec.name} VAE from {src.vae}")
    vae = load_vae(spec, src.vae, device=device, dtype=dtype)
    text_root = src.text_root
    t5_file, t5_tokenizer = src.text_encoder, src.tokenizer

    def load_text() -> TextEncoder:
        target = text_encoder_device(spec, torch.device(device), dtype)
        if text_root is not None:
            say(f"loading the {spec.name} text encoder from {text_root} onto {target}")
            return TextEncoder.from_spec(spec, path=text_root, device=target, dtype=dtype)
        if t5_file is not None and t5_tokenizer is not None:
            say(f"loading the {spec.name} text encoder from {t5_file} onto {target}")
            return load_text_encoder(spec, t5_file, t5_tokenizer, device=target, dtype=dtype)
        note = " (prompts already in the embedding cache work without it)"
        if t5_file is not None:
            note = f"; found {t5_file} but not its tokenizer folder {t5_file.parent / 'google/umt5-xxl'}{note}"
        raise not_found(
            "text encoder",
            f"text_encoder/ and tokenizer/ of {spec.hub_repo}",
            "models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/ ",
            note,
        )

    text = PromptEncoder(
        spec.name,
        load_text,
        text_len=spec.text_len,
        text_dim=spec.text_dim,
        cache_dir=cache_dir,
        namespace=PromptEncoder.for_spec(spec, cache_dir=cache_dir).namespace,
        keep_loaded=torch.device(device).type == "cpu",  # on a GPU: loaded per cache miss, then freed
    )
    if not src.has_text_encoder:
        logger.warning("%s: no text encoder found; only prompts already in %s can be used", spec.name, text.cache_dir)
    text_source = text_root or (t5_file if src.has_text_encoder else None)
    sources = {"transformer": str(main), "vae": str(src.vae), "text_encoder": str(text_source or "none")}
    return ModelBundle(spec=spec, transformer=transformer, vae=vae, text=text, sources=sources)
