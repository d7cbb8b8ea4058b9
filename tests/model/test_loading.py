"""Checkpoint loading: every real on-disk format, written by the test at tiny size, loads to the same weights as the
diffusers-format reference; missing or wrong files give one clear ``CheckpointError``; the hub cache is found."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file
from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from sdlive.daemon.model.bundle import load_model_bundle, load_text_encoder, load_transformer, load_vae
from sdlive.daemon.model.causal_wan import CausalWanTransformer3DModel
from sdlive.daemon.model.configs import TINY, get_model_spec
from sdlive.daemon.model.errors import CheckpointError
from sdlive.daemon.model.formats import (
    UMT5_ORIGINAL,
    UMT5_TRANSFORMERS,
    WAN_TRANSFORMER_DIFFUSERS,
    WAN_TRANSFORMER_ORIGINAL,
    WAN_VAE_DIFFUSERS,
    WAN_VAE_ORIGINAL,
    convert_text_encoder_state_dict,
    convert_transformer_state_dict,
    convert_vae_state_dict,
    detect_format,
    read_checkpoint,
)
from sdlive.daemon.model.hub import PullProgress, _progress_tqdm
from sdlive.daemon.model.text import TextEncoder

# A tiny model with the real Wan layouts: the VAE has Wan2.1's block structure (dim_mult [1,2,4,4], 2 res blocks),
# which diffusers' original-VAE converter assumes; small channels and vocabulary keep the files small.
SPEC = dataclasses.replace(
    TINY,
    name="tiny-real",
    random_weights=False,
    vae={**TINY.vae, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2},
    text_encoder={**TINY.text_encoder, "vocab_size": 384},
    hub_repo="sdlive-test/Wan-tiny-Diffusers",
    generator_repo="sdlive-test/StreamDiffusionV2-tiny",
    generator_file="wan_causal_dmd_v2v/model.pt",
)


# ------------------------------------------------------------------------ writing the foreign formats
def to_original_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers → original Wan key names, written from Wan's module layout (wan/modules/model.py)."""
    top = {
        "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
        "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
        "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
        "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
        "condition_embedder.time_proj.": "time_projection.1.",
        "proj_out.": "head.head.",
        "patch_embedding.": "patch_embedding.",
    }
    block = {
        "attn1.to_q.": "self_attn.q.", "attn1.to_k.": "self_attn.k.", "attn1.to_v.": "self_attn.v.",
        "attn1.to_out.0.": "self_attn.o.", "attn1.norm_q.": "self_attn.norm_q.", "attn1.norm_k.": "self_attn.norm_k.",
        "attn2.to_q.": "cross_attn.q.", "attn2.to_k.": "cross_attn.k.", "attn2.to_v.": "cross_attn.v.",
        "attn2.to_out.0.": "cross_attn.o.", "attn2.norm_q.": "cross_attn.norm_q.", "attn2.norm_k.": "cross_attn.norm_k.",
        "norm2.": "norm3.",  # diffusers' norm2 is the cross-attention norm, Wan's norm3
        "ffn.net.0.proj.": "ffn.0.", "ffn.net.2.": "ffn.2.",
    }  # fmt: skip
    out = {}
    for key, value in state.items():
        if key == "scale_shift_table":
            out["head.modulation"] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m:
            i, rest = m.groups()
            if rest == "scale_shift_table":
                out[f"blocks.{i}.modulation"] = value
                continue
            new = next(o + rest[len(d) :] for d, o in block.items() if rest.startswith(d))
            out[f"blocks.{i}.{new}"] = value
            continue
        out[next(o + key[len(d) :] for d, o in top.items() if key.startswith(d))] = value
    assert len(out) == len(state)
    return out


_RESIDUAL = {"norm1.gamma": "residual.0.gamma", "conv1.": "residual.2.", "norm2.gamma": "residual.3.gamma",
             "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}  # fmt: skip


def _residual(rest: str) -> str:
    return next(o + rest[len(d) :] for d, o in _RESIDUAL.items() if rest.startswith(d))


def to_original_vae(state: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers → Wan2.1_VAE.pth key names, written from Wan's module layout (wan/modules/vae.py): flat
    ``downsamples`` / ``upsamples`` Sequentials, ``middle`` = (res, attn, res), ``head`` = (norm, silu, conv)."""
    per_up = num_res_blocks + 2  # res blocks + 1 extra in the decoder, then the upsampler
    out = {}
    for key, value in state.items():
        part, rest = key.split(".", 1)
        if part == "quant_conv":
            new = "conv1." + rest
        elif part == "post_quant_conv":
            new = "conv2." + rest
        elif m := re.fullmatch(r"conv_in\.(.+)", rest):
            new = f"{part}.conv1.{m[1]}"
        elif rest == "norm_out.gamma":
            new = f"{part}.head.0.gamma"
        elif m := re.fullmatch(r"conv_out\.(.+)", rest):
            new = f"{part}.head.2.{m[1]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
            new = f"{part}.middle.{2 * int(m[1])}.{_residual(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
            new = f"{part}.middle.1.{m[1]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resample|time_conv)(\..+)", rest):
            new = f"encoder.downsamples.{m[1]}.{m[2]}{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
            new = f"encoder.downsamples.{m[1]}.{_residual(m[2])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
            new = f"decoder.upsamples.{int(m[1]) * per_up + int(m[2])}.{_residual(m[3])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
            new = f"decoder.upsamples.{int(m[1]) * per_up + per_up - 1}.{m[2]}"
        else:
            raise AssertionError(f"unmapped VAE key {key}")
        out[new] = value
    assert len(out) == len(state)
    return out


_T5_BLOCK = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight", "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight", "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",  # Wan: fc2(fc1(x) * gelu(gate(x)))
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}  # fmt: skip


def to_original_t5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' UMT5EncoderModel → Wan's T5Encoder key names (models_t5_umt5-xxl-enc-bf16.pth), written from
    Wan's module layout (wan/modules/t5.py: token_embedding, blocks[i].{norm1, attn, norm2, ffn, pos_embedding},
    norm; umt5 has a relative-position table per block)."""
    out = {}
    for key, value in state.items():
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        else:
            m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
            assert m, key
            out[f"blocks.{m[1]}.{_T5_BLOCK[m[2]]}"] = value
    assert len(out) == len(state) - 1  # the tied embedding once
    return out


def _seeded(factory, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def _distinctive(model):
    """Every parameter made distinctive (diffusers zero-inits some, e.g. norms at 1), so a wrong mapping shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.fixture(scope="module")
def ref_transformer() -> CausalWanTransformer3DModel:
    return _distinctive(_seeded(lambda: CausalWanTransformer3DModel(**SPEC.transformer), 11))


@pytest.fixture(scope="module")
def ref_vae() -> AutoencoderKLWan:
    return _distinctive(_seeded(lambda: AutoencoderKLWan(**SPEC.vae), 12))


def _assert_same_weights(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    got, want = model.state_dict(), ref.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _same_transformer_output(model, ref) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 12, SPEC.text_dim, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        a = model(x, t, ctx, return_dict=False)[0]
        b = ref(x, t, ctx, return_dict=False)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _write_diffusers_folder(root: Path, transformer, vae) -> Path:
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    text = _seeded(lambda: UMT5EncoderModel(UMT5Config(**SPEC.text_encoder)), 13)
    text.save_pretrained(root / "text_encoder")
    ByT5Tokenizer().save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    return root


def _write_hub_repo(cache: Path, repo: str, files: dict[str, Path | bytes]) -> Path:
    """Lay out ``files`` the way huggingface_hub's cache stores one revision of ``repo``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    for rel, content in files.items():
        dest = snap / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    return snap


# ------------------------------------------------------------------------ formats and converters
def test_detect_format_on_marker_keys(ref_transformer, ref_vae):
    sd = ref_transformer.state_dict()
    assert detect_format(sd) == WAN_TRANSFORMER_DIFFUSERS
    assert detect_format(to_original_transformer(sd)) == WAN_TRANSFORMER_ORIGINAL
    assert detect_format({f"model.{k}": v for k, v in to_original_transformer(sd).items()}) == WAN_TRANSFORMER_ORIGINAL
    assert detect_format(ref_vae.state_dict()) == WAN_VAE_DIFFUSERS
    assert detect_format(to_original_vae(ref_vae.state_dict(), 2)) == WAN_VAE_ORIGINAL
    assert detect_format({"conv.weight": torch.zeros(1)}) is None


def test_original_transformer_safetensors_loads_like_diffusers(tmp_path, ref_transformer):
    original = to_original_transformer(ref_transformer.state_dict())
    assert "blocks.0.norm3.weight" in original and "blocks.0.norm2.weight" not in original
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(original, path)
    model = load_transformer(SPEC, path)
    assert isinstance(model, CausalWanTransformer3DModel)
    _assert_same_weights(model, ref_transformer)
    # norm2↔norm3: Wan's cross-attention norm (norm3) is diffusers' norm2.
    assert torch.equal(model.blocks[0].norm2.weight, original["blocks.0.norm3.weight"])
    _same_transformer_output(model, ref_transformer)


@pytest.mark.parametrize("entry", ["generator", "generator_ema", "state_dict", None])
@pytest.mark.parametrize("prefix", ["", "model."])
def test_streamdiffusionv2_model_pt_loads(tmp_path, ref_transformer, entry, prefix):
    original = {prefix + k: v for k, v in to_original_transformer(ref_transformer.state_dict()).items()}
    payload = original if entry is None else {entry: original, "step": torch.tensor(1000)}
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    _assert_same_weights(load_transformer(SPEC, path), ref_transformer)


def test_model_pt_prefers_generator_over_ema_like_upstream(tmp_path, ref_transformer):
    good = to_original_transformer(ref_transformer.state_dict())
    other = {k: torch.zeros_like(v) for k, v in good.items()}
    torch.save({"generator_ema": other, "generator": good}, tmp_path / "model.pt")
    _assert_same_weights(load_transformer(SPEC, tmp_path / "model.pt"), ref_transformer)


def test_original_vae_pth_loads_like_diffusers(tmp_path, ref_vae):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(to_original_vae(ref_vae.state_dict(), SPEC.vae["num_res_blocks"]), path)
    vae = load_vae(SPEC, path)
    _assert_same_weights(vae, ref_vae)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 16, 2, 2, 2, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, ref_vae.decode(z).sample, rtol=0, atol=0)


def test_diffusers_folder_bundle(tmp_path, ref_transformer, ref_vae):
    root = _write_diffusers_folder(tmp_path / "Wan-tiny-Diffusers", ref_transformer, ref_vae)
    bundle = load_model_bundle(
        SPEC, weights=root, cache_dir=tmp_path / "prompts", hub_cache_dir=tmp_path / "hub", base_only=True
    )
    _assert_same_weights(bundle.transformer, ref_transformer)
    _assert_same_weights(bundle.vae, ref_vae)
    assert bundle.sources["transformer"].endswith("transformer/diffusion_pytorch_model.safetensors")
    emb = bundle.text.encode("a red fox")
    assert emb.shape == (1, 512, SPEC.text_dim)
    expected = TextEncoder.from_spec(SPEC, path=root).encode("a red fox")
    torch.testing.assert_close(emb, expected, rtol=0, atol=0)
    svae = bundle.new_vae()
    assert svae.encode(torch.zeros(1, 3, 5, 16, 16)).shape == (1, 16, 2, 2, 2)


def test_generator_in_weights_folder_overrides_base_transformer(tmp_path, ref_transformer, ref_vae):
    base = _seeded(lambda: CausalWanTransformer3DModel(**SPEC.transformer), 99)
    root = _write_diffusers_folder(tmp_path / "w", base, ref_vae)
    (root / "wan_causal_dmd_v2v").mkdir()
    torch.save({"generator": to_original_transformer(ref_transformer.state_dict())}, root / SPEC.generator_file)
    bundle = load_model_bundle(SPEC, weights=root, cache_dir=tmp_path / "prompts", hub_cache_dir=tmp_path / "hub")
    _assert_same_weights(bundle.transformer, ref_transformer)


def test_partial_generator_is_filled_from_the_base(tmp_path, ref_transformer, ref_vae):
    root = _write_diffusers_folder(tmp_path / "w", ref_transformer, ref_vae)
    partial = {k: v for k, v in to_original_transformer(ref_transformer.state_dict()).items() if "blocks.1." in k}
    partial["head.modulation"] = torch.zeros_like(partial.get("head.modulation", ref_transformer.scale_shift_table))
    torch.save({"generator": partial}, root / "model.pt")
    bundle = load_model_bundle(SPEC, weights=root, cache_dir=tmp_path / "prompts", hub_cache_dir=tmp_path / "hub")
    assert torch.count_nonzero(bundle.transformer.scale_shift_table) == 0  # from the generator
    torch.testing.assert_close(
        bundle.transformer.blocks[0].attn1.to_q.weight, ref_transformer.blocks[0].attn1.to_q.weight
    )


def test_hub_cache_bundle(tmp_path, ref_transformer, ref_vae, monkeypatch):
    """Base repo (vae/, text_encoder/, tokenizer/) and generator found through huggingface_hub's cache layout."""
    staging = _write_diffusers_folder(tmp_path / "staging", ref_transformer, ref_vae)
    hub = tmp_path / "hub"
    files = {str(p.relative_to(staging)): p for p in staging.rglob("*") if p.is_file() and "transformer" not in p.parts}
    _write_hub_repo(hub, SPEC.hub_repo, files)
    gen = tmp_path / "model.pt"
    torch.save({"generator": to_original_transformer(ref_transformer.state_dict())}, gen)
    _write_hub_repo(hub, SPEC.generator_repo, {SPEC.generator_file: gen})

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # as HF_HUB_CACHE=… would
    bundle = load_model_bundle(SPEC, cache_dir=tmp_path / "prompts")
    _assert_same_weights(bundle.transformer, ref_transformer)
    _assert_same_weights(bundle.vae, ref_vae)
    assert "models--sdlive-test--StreamDiffusionV2-tiny" in bundle.sources["transformer"]
    assert bundle.text.encode("hello").shape == (1, 512, SPEC.text_dim)


def test_bf16_keeps_fp32_modules(tmp_path, ref_transformer):
    path = tmp_path / "t.safetensors"
    save_file(ref_transformer.state_dict(), path)
    model = load_transformer(SPEC, path, dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.scale_shift_table.dtype == torch.float32
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32


# ------------------------------------------------------------------------ tiny
def test_tiny_is_deterministic_and_leaves_rng_alone(tmp_path):
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    a = load_model_bundle("tiny", cache_dir=tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = load_model_bundle("tiny", cache_dir=tmp_path)
    _assert_same_weights(a.transformer, b.transformer)
    _assert_same_weights(a.vae, b.vae)
    assert isinstance(a.transformer, CausalWanTransformer3DModel)
    assert a.sources["transformer"] == "random (seed 0)"


# ------------------------------------------------------------------------ errors
def test_missing_file_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(CheckpointError, match=r"nope/model\.pt does not exist.*sdlive models pull wan2\.1-1\.3b"):
        load_model_bundle(SPEC, weights=missing, hub_cache_dir=tmp_path / "hub")


def test_nothing_on_disk_names_the_pull_command(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_model_bundle("wan2.1-1.3b", hub_cache_dir=tmp_path / "empty-hub", cache_dir=tmp_path)
    msg = str(info.value)
    assert "jerryfeng/StreamDiffusionV2/wan_causal_dmd_v2v/model.pt" in msg
    assert "sdlive models pull wan2.1-1.3b" in msg
    assert isinstance(info.value, ValueError)


def test_wrong_files_are_one_clear_error(tmp_path, ref_transformer, ref_vae):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*model\.pt"):
        load_transformer(SPEC, garbage)

    vae_file = tmp_path / "vae.safetensors"
    save_file(ref_vae.state_dict(), vae_file)
    with pytest.raises(
        CheckpointError, match=r"vae\.safetensors is a diffusers-format Wan VAE, expected a Wan transformer"
    ):
        load_transformer(SPEC, vae_file)

    unknown = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, unknown)
    with pytest.raises(CheckpointError, match="no known format"):
        load_vae(SPEC, unknown)

    # The right format for another model size: shapes are named.
    bigger = dataclasses.replace(SPEC, transformer={**SPEC.transformer, "ffn_dim": 512})
    t_file = tmp_path / "t.safetensors"
    save_file(ref_transformer.state_dict(), t_file)
    with pytest.raises(CheckpointError, match=r"t\.safetensors is not a tiny-real transformer: .*shape mismatches"):
        load_transformer(bigger, t_file)

    # A model.pt whose dict holds no state dict.
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
        read_checkpoint(tmp_path / "opt.pt")


def test_weights_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no tiny-real weights found in .*empty"):
        load_model_bundle(SPEC, weights=tmp_path / "empty", hub_cache_dir=tmp_path / "hub")


def test_missing_text_encoder_errors_only_for_unknown_prompts(tmp_path, ref_transformer, ref_vae):
    root = tmp_path / "w"
    ref_transformer.save_pretrained(root / "transformer")
    ref_vae.save_pretrained(root / "vae")
    bundle = load_model_bundle(
        SPEC, weights=root, cache_dir=tmp_path / "prompts", hub_cache_dir=tmp_path / "hub", base_only=True
    )
    with pytest.raises(CheckpointError, match=r"text encoder was not found.*sdlive models pull"):
        bundle.text.encode("new prompt")


def test_pull_progress_forwards_byte_counts():
    """The tqdm class handed to huggingface_hub turns its byte updates into PullProgress events."""
    events: list[PullProgress] = []
    bar_cls = _progress_tqdm("org/repo", events.append)
    bar_cls(total=3, desc="Fetching 3 files").update(1)  # a file counter, not bytes: not forwarded
    bar_cls(total=0, desc="Downloading bytes", unit="B", name="huggingface_hub.snapshot_download.transfer").update(9)
    bar = bar_cls(total=100, desc="vae/diffusion_pytorch_model.safetensors", unit="B")
    bar.update(40)
    bar.update(60)
    bar.close()
    assert [(e.file, e.done, e.total) for e in events] == [
        ("vae/diffusion_pytorch_model.safetensors", 0, 100),
        ("vae/diffusion_pytorch_model.safetensors", 40, 100),
        ("vae/diffusion_pytorch_model.safetensors", 100, 100),
    ]
    assert all(e.repo == "org/repo" for e in events)


def test_tiny_weights_override_the_seeded_parts(tmp_path):
    """A trained tiny-shaped transformer file replaces the seeded one; the VAE stays seeded."""
    seeded = load_model_bundle("tiny", cache_dir=tmp_path)
    trained = _seeded(lambda: CausalWanTransformer3DModel(**TINY.transformer), 21)
    path = tmp_path / "tiny.safetensors"
    save_file(to_original_transformer(trained.state_dict()), path)
    bundle = load_model_bundle("tiny", weights=path, cache_dir=tmp_path, hub_cache_dir=tmp_path / "hub")
    _assert_same_weights(bundle.transformer, trained)
    _assert_same_weights(bundle.vae, seeded.vae)
    assert bundle.sources["transformer"] == str(path)


def test_legacy_torch_save_format_is_read(tmp_path, ref_transformer):
    path = tmp_path / "model.pt"
    original = to_original_transformer(ref_transformer.state_dict())
    torch.save({"generator": original}, path, _use_new_zipfile_serialization=False)
    _assert_same_weights(load_transformer(SPEC, path), ref_transformer)


def test_model_pt_with_wrapper_extras_keeps_the_model_keys(tmp_path, ref_transformer):
    """A generator wrapper's dict: the model under `model.` next to other entries (upstream loads it non-strictly)."""
    state = {f"model.{k}": v for k, v in to_original_transformer(ref_transformer.state_dict()).items()}
    state["scheduler.sigmas"] = torch.linspace(1, 0, 10)
    torch.save({"generator": state}, tmp_path / "model.pt")
    _assert_same_weights(load_transformer(SPEC, tmp_path / "model.pt"), ref_transformer)


@pytest.mark.parametrize("name", ["wan2.1-1.3b", "wan2.1-14b"])
def test_real_spec_keys_round_trip_through_the_converters(name):
    """At the real shapes (on meta: no memory), original Wan key names convert onto exactly our model's keys."""
    from accelerate import init_empty_weights

    spec = get_model_spec(name)
    with init_empty_weights():
        transformer = CausalWanTransformer3DModel(**spec.transformer)
        vae = AutoencoderKLWan(**spec.vae)
    t_state = transformer.state_dict()
    converted = convert_transformer_state_dict(to_original_transformer(t_state))
    assert sorted(converted) == sorted(t_state)
    assert all(converted[k].shape == t_state[k].shape for k in t_state)
    v_state = vae.state_dict()
    converted = convert_vae_state_dict(to_original_vae(v_state, spec.vae["num_res_blocks"]))
    assert sorted(converted) == sorted(v_state)
    assert all(converted[k].shape == v_state[k].shape for k in v_state)


# ------------------------------------------------------------------------ upstream StreamDiffusionV2's tree
BASE_DIR = "Wan-tiny"  # upstream's wan_models/<base>: the original Wan repo's name (SPEC.hub_repo minus -Diffusers)


@pytest.fixture(scope="module")
def ref_text() -> UMT5EncoderModel:
    return _distinctive(_seeded(lambda: UMT5EncoderModel(UMT5Config(**SPEC.text_encoder)), 13))


def _write_original_wan_folder(folder: Path, base_transformer, vae, text) -> Path:
    """upstream's wan_models/Wan2.1-T2V-1.3B/: the files the original Wan repo ships, in its formats."""
    folder.mkdir(parents=True)
    save_file(to_original_transformer(base_transformer.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text('{"_class_name": "WanModel", "model_type": "t2v"}')
    torch.save(to_original_vae(vae.state_dict(), SPEC.vae["num_res_blocks"]), folder / "Wan2.1_VAE.pth")
    torch.save(to_original_t5(text.state_dict()), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    ByT5Tokenizer().save_pretrained(folder / "google" / "umt5-xxl")
    return folder


def _write_upstream_tree(root: Path, generator, base_transformer, vae, text) -> Path:
    """upstream's layout: wan_models/<base>/ (README: huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B) and
    ckpts/wan_causal_dmd_v2v/model.pt (huggingface-cli download jerryfeng/StreamDiffusionV2), the generator as
    upstream's trainer saves it: {"generator": state dict with Wan key names}."""
    _write_original_wan_folder(root / "wan_models" / BASE_DIR, base_transformer, vae, text)
    gen = root / "ckpts" / SPEC.generator_file
    gen.parent.mkdir(parents=True)
    torch.save({"generator": to_original_transformer(generator.state_dict())}, gen)
    return root


@pytest.fixture(scope="module")
def upstream_tree(tmp_path_factory, ref_transformer, ref_vae, ref_text) -> Path:
    base = _seeded(lambda: CausalWanTransformer3DModel(**SPEC.transformer), 98)  # not the generator's weights
    return _write_upstream_tree(tmp_path_factory.mktemp("upstream") / "StreamDiffusionV2", ref_transformer, base,
                                ref_vae, ref_text)  # fmt: skip


def test_wan_t5_file_converts_onto_transformers_keys(ref_text):
    original = to_original_t5(ref_text.state_dict())
    assert detect_format(original) == UMT5_ORIGINAL
    assert detect_format(ref_text.state_dict()) == UMT5_TRANSFORMERS
    converted = convert_text_encoder_state_dict(original)
    want = ref_text.state_dict()
    assert sorted(converted) == sorted(want)
    assert all(torch.equal(converted[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "given", ["", "ckpts", "ckpts/wan_causal_dmd_v2v", "ckpts/wan_causal_dmd_v2v/model.pt", "wan_models",
              f"wan_models/{BASE_DIR}"],
    ids=["root", "ckpts", "generator-folder", "generator-file", "wan_models", "wan-folder"],
)  # fmt: skip
def test_every_upstream_layout_loads_the_same_weights(tmp_path, upstream_tree, given, ref_transformer, ref_vae,
                                                      ref_text):  # fmt: skip
    """Any folder of upstream's tree is the whole model: generator, VAE, UMT5 and tokenizer, bitwise."""
    bundle = load_model_bundle(
        SPEC, weights=upstream_tree / given, cache_dir=tmp_path / "prompts", hub_cache_dir=tmp_path / "empty-hub"
    )
    _assert_same_weights(bundle.transformer, ref_transformer)  # the generator, not the base model
    _assert_same_weights(bundle.vae, ref_vae)
    assert bundle.sources["transformer"].endswith("ckpts/wan_causal_dmd_v2v/model.pt")
    assert bundle.sources["vae"].endswith(f"{BASE_DIR}/Wan2.1_VAE.pth")
    assert bundle.sources["text_encoder"].endswith("models_t5_umt5-xxl-enc-bf16.pth")
    encoder = bundle.text._load_encoder()
    _assert_same_weights(encoder.model, ref_text)
    # The embedding equals the one from the same weights in the diffusers layout.
    ref_text.save_pretrained(tmp_path / "d" / "text_encoder")
    ByT5Tokenizer().save_pretrained(tmp_path / "d" / "tokenizer")
    expected = TextEncoder.from_spec(SPEC, path=tmp_path / "d").encode("a red fox")
    torch.testing.assert_close(bundle.text.encode("a red fox"), expected, rtol=0, atol=0)


def test_public_loaders_read_upstream_files(upstream_tree, ref_transformer, ref_vae, ref_text):
    wan = upstream_tree / "wan_models" / BASE_DIR
    _assert_same_weights(load_transformer(SPEC, upstream_tree / "ckpts" / SPEC.generator_file), ref_transformer)
    _assert_same_weights(load_vae(SPEC, wan / "Wan2.1_VAE.pth"), ref_vae)
    text = load_text_encoder(SPEC, wan / "models_t5_umt5-xxl-enc-bf16.pth", wan / "google" / "umt5-xxl")
    _assert_same_weights(text.model, ref_text)


def test_wan_folder_without_generator_is_refused_unless_asked(tmp_path, ref_transformer, ref_vae, ref_text):
    """Upstream's base Wan folder alone: a CheckpointError naming what was found and what is missing, not a silent
    undistilled model; base_only=True runs it."""
    wan = _write_original_wan_folder(tmp_path / "wan_models" / BASE_DIR, ref_transformer, ref_vae, ref_text)
    kw = {"cache_dir": tmp_path / "prompts", "hub_cache_dir": tmp_path / "empty-hub"}
    with pytest.raises(CheckpointError) as info:
        load_model_bundle(SPEC, weights=wan, **kw)
    msg = str(info.value)
    assert "diffusion_pytorch_model.safetensors" in msg and "Wan2.1_VAE.pth" in msg  # found
    assert "no StreamDiffusionV2 generator" in msg and "wan_causal_dmd_v2v/model.pt" in msg  # missing
    assert "--allow-base-model" in msg and "sdlive models pull" in msg  # the fixes
    bundle = load_model_bundle(SPEC, weights=wan, base_only=True, **kw)
    _assert_same_weights(bundle.transformer, ref_transformer)
    _assert_same_weights(bundle.vae, ref_vae)


def test_diffusers_folder_without_generator_is_refused_too(tmp_path, ref_transformer, ref_vae):
    root = _write_diffusers_folder(tmp_path / "Wan-tiny-Diffusers", ref_transformer, ref_vae)
    with pytest.raises(CheckpointError, match=r"no StreamDiffusionV2 generator.*--allow-base-model"):
        load_model_bundle(SPEC, weights=root, cache_dir=tmp_path / "prompts", hub_cache_dir=tmp_path / "hub")


def test_wan_t5_without_tokenizer_names_it(tmp_path, ref_transformer, ref_vae, ref_text):
    wan = _write_original_wan_folder(tmp_path / "wan", ref_transformer, ref_vae, ref_text)
    import shutil

    shutil.rmtree(wan / "google")
    bundle = load_model_bundle(
        SPEC, weights=wan, cache_dir=tmp_path / "prompts", hub_cache_dir=tmp_path / "hub", base_only=True
    )
    with pytest.raises(CheckpointError, match=r"found .*models_t5_umt5-xxl-enc-bf16\.pth but not its tokenizer"):
        bundle.text.encode("new prompt")


def test_the_one_wan_folder_under_another_name_is_found(tmp_path, upstream_tree, ref_transformer, ref_vae):
    import shutil

    root = tmp_path / "sdv2"
    shutil.copytree(upstream_tree, root)
    (root / "wan_models" / BASE_DIR).rename(root / "wan_models" / "Wan2.1-T2V-1.3B-local")
    bundle = load_model_bundle(SPEC, weights=root / "ckpts", cache_dir=tmp_path / "p", hub_cache_dir=tmp_path / "h")
    _assert_same_weights(bundle.transformer, ref_transformer)
    _assert_same_weights(bundle.vae, ref_vae)
    assert "Wan2.1-T2V-1.3B-local" in bundle.sources["vae"]
