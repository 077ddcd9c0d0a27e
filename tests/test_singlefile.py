"""Single-file checkpoints (the official ``sd3.5_large.safetensors`` + ``text_encoders/`` layout).

Every tiny variant is exported to the official layout (SAI keys, ldm VAE, fp16/fp8 text encoder
files) and loaded back: the round trip through diffusers' own converter is exact, and a pipeline
built from the single file draws the same pixels as the diffusers folder. All offline; a socket
guard proves the network is never touched.
"""

from __future__ import annotations

import functools
import shutil
import socket

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.config import StudioConfig
from studio.models import ModelError, ModelManager, Placement, default_placement
from studio.models.singlefile import (
    CONFIG_ENV,
    CONFIG_PATTERNS,
    detect_variant,
    inspect_file,
    resolve_single_file,
)
from studio.demo.tiny import TINY_VARIANTS
from tests.exporters import export_official_layout

PROMPT = "a photo of a red fox"
GEN = dict(height=256, width=256, num_inference_steps=2, guidance_scale=4.5, output_type="np")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv(CONFIG_ENV, raising=False)


@pytest.fixture(autouse=True)
def empty_hf_cache(monkeypatch, tmp_path):
    """No test may find configs in the user's real Hugging Face cache by accident."""
    import huggingface_hub.constants as C

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def exported(tiny_family, tmp_path_factory):
    """{variant: single file} — each tiny variant in the official layout, in its own folder."""
    root = tmp_path_factory.mktemp("official")
    return {v: export_official_layout(tiny_family[v], root / v, v) for v in TINY_VARIANTS}


def _config(tmp_path, base=None) -> StudioConfig:
    config = StudioConfig(data_dir=tmp_path / "data")
    if base is not None:
        config.single_file_config_dir = base  # the field is added to StudioConfig elsewhere
    return config


def _cpu():
    return default_placement("cpu")  # fp32


def _copy_release(file, dest, text_encoders=("clip_l", "clip_g", "t5xxl_fp16", "t5xxl_fp8_e4m3fn")):
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(file, dest / file.name)
    if text_encoders:
        (dest / "text_encoders").mkdir()
        for name in text_encoders:
            shutil.copy(file.parent / "text_encoders" / f"{name}.safetensors", dest / "text_encoders")
    return dest / file.name


# --- the layout ---------------------------------------------------------------------------------


def test_export_writes_the_official_layout(exported):
    file = exported["sd3.5-medium"]
    assert file.name == "sd3.5_medium.safetensors"
    names = sorted(p.name for p in (file.parent / "text_encoders").iterdir())
    assert names == ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors"]
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in keys
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in keys
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight" in keys
    assert "model.diffusion_model.final_layer.adaLN_modulation.1.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert not any(k.startswith(("text_encoders.", "transformer_blocks.")) for k in keys), "no encoders inside"
    te = file.parent / "text_encoders"
    with safe_open(str(te / "t5xxl_fp8_e4m3fn.safetensors"), "pt") as f:
        assert f.get_tensor("encoder.block.0.layer.0.SelfAttention.q.weight").dtype == torch.float8_e4m3fn
    with safe_open(str(te / "clip_l.safetensors"), "pt") as f:
        assert f.get_tensor("text_projection.weight").dtype == torch.float16


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_detect_variant(exported, variant):
    assert detect_variant(exported[variant]) == variant
    info = inspect_file(exported[variant])
    assert info.has_vae and info.prefix == "model.diffusion_model."


def _header_file(path, keys, pos_len=64):
    tensors = {k: torch.zeros(1, dtype=torch.float16) for k in keys}
    tensors["model.diffusion_model.pos_embed"] = torch.zeros(1, pos_len, 1, dtype=torch.float16)
    save_file(tensors, str(path))
    return path


def test_detect_variant_by_the_real_detection_keys(tmp_path):
    """The real releases: block 37 ⇒ Large, pos_embed 147456 ⇒ 3.5 Medium, 36864 ⇒ SD3 Medium."""
    block0 = "model.diffusion_model.joint_blocks.0.x_block.mlp.fc1.weight"
    large = "model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight"
    assert detect_variant(_header_file(tmp_path / "a.safetensors", [block0, large], 36864)) == "sd3.5-large"
    assert detect_variant(_header_file(tmp_path / "my_turbo.safetensors", [block0, large], 36864)) == "sd3.5-large-turbo"
    assert detect_variant(_header_file(tmp_path / "b.safetensors", [block0], 147456)) == "sd3.5-medium"
    assert detect_variant(_header_file(tmp_path / "c.safetensors", [block0], 36864)) == "sd3-medium"
    # keys without the model.diffusion_model. prefix are understood too
    save_file({"joint_blocks.0.x_block.attn.ln_q.weight": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    assert detect_variant(tmp_path / "bare.safetensors") == "sd3.5-large"


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_transformer_and_vae_round_trip_exactly(tiny_family, exported, variant):
    """diffusers' own converter, fed the exported file, gives back the original weights bit for bit."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    folder, file = tiny_family[variant], exported[variant]
    orig = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    model = SD3Transformer2DModel.from_single_file(
        str(file), config=str(folder), subfolder="transformer", local_files_only=True
    )
    sd = model.state_dict()
    assert set(sd) == set(orig)
    assert all(torch.equal(sd[k], orig[k]) for k in orig)

    vorig = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    vae = AutoencoderKL.from_single_file(str(file), config=str(folder), subfolder="vae", local_files_only=True)
    vsd = vae.state_dict()
    assert set(vsd) == set(vorig)
    assert all(torch.equal(vsd[k], vorig[k]) for k in vorig)


@pytest.mark.parametrize("variant", ["sd3.5-medium", "sd3-medium"])
def test_overrides_load_the_same_weights(tiny_family, exported, variant, tmp_path):
    folder, file = tiny_family[variant], exported[variant]
    base, overrides = resolve_single_file(file, _config(tmp_path, folder))
    assert base == folder
    assert set(overrides) == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    placement = _cpu()
    for component in ("transformer", "vae"):
        orig = load_file(str(folder / component / "diffusion_pytorch_model.safetensors"))
        sd = overrides[component].load(placement).state_dict()
        assert set(sd) == set(orig) and all(torch.equal(sd[k], orig[k]) for k in orig), component
    # text encoders from the fp16 files: the originals rounded to fp16, exactly
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        orig = load_file(str(folder / component / "model.safetensors"))
        model = overrides[component].load(placement)
        sd = model.state_dict()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        for k, v in orig.items():
            assert torch.equal(sd[k], v.half().float()), (component, k)
            assert (sd[k] - v).abs().max() <= v.abs().max() * 2**-10, "within fp16 rounding"
    assert overrides["text_encoder_3"].file.name == "t5xxl_fp16.safetensors", "fp16 preferred over fp8"
    # bf16 placement: the modules come in the placement's dtype
    bf16 = Placement(name="bf16", device="cpu", dtype=torch.bfloat16)
    assert overrides["text_encoder"].load(bf16).dtype == torch.bfloat16
    assert next(overrides["transformer"].load(bf16).parameters()).dtype == torch.bfloat16


def test_fp8_t5_loads_and_runs(tiny_family, exported, tmp_path):
    folder = tiny_family["sd3.5-large"]
    file = _copy_release(exported["sd3.5-large"], tmp_path / "rel", ("clip_l", "clip_g", "t5xxl_fp8_e4m3fn"))
    _, overrides = resolve_single_file(file, _config(tmp_path, folder))
    assert overrides["text_encoder_3"].file.name == "t5xxl_fp8_e4m3fn.safetensors"
    t5 = overrides["text_encoder_3"].load(_cpu())
    assert all(p.dtype == torch.float32 for p in t5.parameters()), "upcast to the placement dtype"
    from transformers import T5EncoderModel

    ref = T5EncoderModel.from_pretrained(folder / "text_encoder_3")
    ids = torch.tensor([[3, 4, 5, 6, 1]])
    with torch.no_grad():
        out = t5(ids).last_hidden_state
        want = ref(ids).last_hidden_state
    assert torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), want.flatten(), dim=0)
    assert cos > 0.95, f"fp8 T5 drifts too far from the original (cosine {cos:.3f})"
    # a different file ⇒ a different identity (never confused with the fp16 one in the cache)
    _, fp16 = resolve_single_file(exported["sd3.5-large"], _config(tmp_path, folder))
    assert fp16["text_encoder_3"].identity != overrides["text_encoder_3"].identity
    assert fp16["text_encoder"].identity == overrides["text_encoder"].identity


# --- end to end through the ModelManager ----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _reference_images(folder):
    """(image from the diffusers folder, same with the text encoders rounded through fp16)."""
    from diffusers import StableDiffusion3Pipeline

    ref = StableDiffusion3Pipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    plain = ref(PROMPT, generator=torch.Generator().manual_seed(7), **GEN).images[0]
    with torch.no_grad():
        for te in (ref.text_encoder, ref.text_encoder_2, ref.text_encoder_3):
            for p in te.parameters():
                p.copy_(p.half().float())
    rounded = ref(PROMPT, generator=torch.Generator().manual_seed(7), **GEN).images[0]
    return plain, rounded


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_single_file_generates_the_same_image_as_the_folder(tiny_family, exported, variant, tmp_path):
    manager = ModelManager(_config(tmp_path, tiny_family[variant]), placement=_cpu())
    loaded = manager.load(str(exported[variant]))
    assert loaded.variant.name == variant
    assert set(loaded.fresh) >= {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    image = loaded.pipe(PROMPT, generator=torch.Generator().manual_seed(7), **GEN).images[0]
    assert image.shape == (256, 256, 3)
    plain, rounded = _reference_images(tiny_family[variant])
    # The release stores the text encoders in fp16: against a folder pipeline whose encoders are
    # rounded the same way, the pixels agree to float32 rounding (the weights are bit-identical,
    # test_overrides_load_the_same_weights; CLIP's matmuls on differently aligned copies of the
    # same weights differ in the last bit here, 3.5e-6 at most); against the fp32 folder, nearly so.
    assert np.abs(image - rounded).max() < 1e-5
    assert np.abs(image - plain).max() < 0.01


def test_switching_single_files_reuses_encoders_and_vae(tiny_family, exported, tmp_path):
    config = _config(tmp_path, tiny_family["sd3.5-large"])
    manager = ModelManager(config, placement=_cpu())
    first = manager.load(str(exported["sd3.5-large"]))
    config.single_file_config_dir = tiny_family["sd3.5-large-turbo"]
    second = manager.load(str(exported["sd3.5-large-turbo"]))
    assert second.variant.name == "sd3.5-large-turbo"
    assert list(second.fresh) == ["transformer"], "same encoder files and VAE bytes ⇒ shared"
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert getattr(second.pipe, name) is getattr(first.pipe, name), name


# --- where the configs come from -------------------------------------------------------------------


def test_config_folder_from_the_environment(tiny_family, exported, tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(tiny_family["sd3-medium"]))
    seen = []
    base, _ = resolve_single_file(exported["sd3-medium"], _config(tmp_path), progress=lambda m, f: seen.append(m))
    assert base == tiny_family["sd3-medium"]
    assert seen == ["Identifying sd3_medium.safetensors"]


def _fake_hub_snapshot(cache, repo, folder):
    """A Hugging Face cache entry for ``repo`` holding only the config patterns (no weights)."""
    import fnmatch

    entry = cache / ("models--" + repo.replace("/", "--"))
    snap = entry / "snapshots" / ("0" * 40)
    for f in folder.rglob("*"):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in CONFIG_PATTERNS):
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, snap / rel)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0" * 40)
    return snap


def test_configs_from_the_hub_cache_without_any_weights(tiny_family, exported, tmp_path, empty_hf_cache):
    """Only the JSON files and tokenizers of the repo are cached: the file supplies every weight."""
    snap = _fake_hub_snapshot(empty_hf_cache, "stabilityai/stable-diffusion-3.5-large", tiny_family["sd3.5-large-turbo"])
    assert not list(snap.rglob("*.safetensors"))
    # Turbo's own repo is not cached: Large's configs (same architecture) serve it
    manager = ModelManager(_config(tmp_path), placement=_cpu())
    loaded = manager.load(str(exported["sd3.5-large-turbo"]))
    assert loaded.variant.name == "sd3.5-large-turbo"
    image = loaded.pipe(PROMPT, generator=torch.Generator().manual_seed(7), **GEN).images[0]
    assert np.isfinite(image).all() and image.std() > 0


def test_no_config_source_says_how_to_get_one(exported, tmp_path):
    with pytest.raises(ModelError) as e:
        resolve_single_file(exported["sd3.5-large"], _config(tmp_path))
    msg = str(e.value)
    assert 'hf download stabilityai/stable-diffusion-3.5-large --include "*.json" "tokenizer*/*" "scheduler/*"' in msg
    assert "licence" in msg and CONFIG_ENV in msg
    # a file without a VAE also needs the VAE weights from the repo
    bare = tmp_path / "novae" / "sd3.5_medium.safetensors"
    bare.parent.mkdir()
    with safe_open(str(exported["sd3.5-medium"]), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}, str(bare))
    with pytest.raises(ModelError, match=r'"scheduler/\*" "vae/\*"'):
        resolve_single_file(bare, _config(tmp_path))


def test_file_without_vae_takes_the_vae_from_the_base_folder(tiny_family, exported, tmp_path):
    folder = tiny_family["sd3.5-medium"]
    bare = _copy_release(exported["sd3.5-medium"], tmp_path / "rel")
    with safe_open(str(bare), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
    save_file(tensors, str(bare))
    _, overrides = resolve_single_file(bare, _config(tmp_path, folder))
    assert "vae" not in overrides and "transformer" in overrides
    manager = ModelManager(_config(tmp_path, folder), placement=_cpu())
    loaded = manager.load(str(bare))
    assert loaded.pipe.vae is not None


def test_config_folder_of_another_variant_is_refused(tiny_family, exported, tmp_path):
    with pytest.raises(ModelError, match=r"is for SD3\.5 Large, but sd3\.5_medium\.safetensors is SD3\.5 Medium"):
        resolve_single_file(exported["sd3.5-medium"], _config(tmp_path, tiny_family["sd3.5-large"]))


def test_config_folder_that_is_not_a_diffusers_folder(exported, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"lacks model_index\.json.*tokenizer/"):
        resolve_single_file(exported["sd3.5-medium"], _config(tmp_path, empty))


# --- failure modes ----------------------------------------------------------------------------------


def test_missing_text_encoders(tiny_family, exported, tmp_path):
    file = _copy_release(exported["sd3.5-large"], tmp_path / "alone", text_encoders=())
    with pytest.raises(ModelError) as e:
        resolve_single_file(file, _config(tmp_path, tiny_family["sd3.5-large"]))
    msg = str(e.value)
    assert "text encoders of sd3.5_large.safetensors were not found (clip_l.safetensors / clip_g.safetensors)" in msg
    for folder in (tmp_path / "alone" / "text_encoders", tmp_path / "alone" / "clip", tmp_path / "alone",
                   tmp_path / "text_encoders", tmp_path / "clip"):  # every folder searched is listed
        assert f"  {folder}/\n" in msg
    assert "hf download stabilityai/stable-diffusion-3.5-large" in msg
    # also through the manager, which keeps nothing half-loaded
    manager = ModelManager(_config(tmp_path, tiny_family["sd3.5-large"]), placement=_cpu())
    with pytest.raises(ModelError, match="were not found"):
        manager.load(str(file))
    assert manager.current is None


def test_text_encoders_in_the_parent_folder(tiny_family, exported, tmp_path):
    """ComfyUI-style: models/checkpoints/x.safetensors beside models/text_encoders/."""
    root = tmp_path / "models"
    shutil.copytree(exported["sd3.5-large"].parent / "text_encoders", root / "text_encoders")
    file = _copy_release(exported["sd3.5-large"], root / "checkpoints", text_encoders=())
    _, overrides = resolve_single_file(file, _config(tmp_path, tiny_family["sd3.5-large"]))
    assert overrides["text_encoder"].file == root / "text_encoders" / "clip_l.safetensors"


def test_missing_t5_fails_only_when_t5_is_loaded(tiny_family, exported, tmp_path):
    folder = tiny_family["sd3.5-large"]
    file = _copy_release(exported["sd3.5-large"], tmp_path / "rel", ("clip_l", "clip_g"))
    manager = ModelManager(_config(tmp_path, folder), placement=_cpu())
    with pytest.raises(ModelError, match=r"t5xxl_fp16\.safetensors / t5xxl_fp8_e4m3fn_scaled\.safetensors / "
                                          r"t5xxl_fp8_e4m3fn\.safetensors"):
        manager.load(str(file))
    no_t5 = Placement(name="no-t5", device="cpu", dtype=torch.float32, skip=("text_encoder_3",))
    loaded = manager.load(str(file), placement=no_t5)
    assert loaded.pipe.text_encoder_3 is None
    image = loaded.pipe(PROMPT, generator=torch.Generator().manual_seed(7), **GEN).images[0]
    assert np.isfinite(image).all()


def test_truncated_files(tiny_family, exported, tmp_path):
    data = exported["sd3.5-medium"].read_bytes()
    for name, content in [
        ("half.safetensors", data[: len(data) // 2]),
        ("header-only.safetensors", data[:100]),
        ("tiny.safetensors", b"\x01\x02"),
        ("garbage.safetensors", b"\xff" * 4096),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ModelError, match=r"is not a valid \.safetensors file \(truncated or corrupt\?\)"):
            detect_variant(path)
        manager = ModelManager(_config(tmp_path, tiny_family["sd3.5-medium"]), placement=_cpu())
        with pytest.raises(ModelError, match="truncated or corrupt"):
            manager.load(str(path))
    # a truncated text encoder is caught before anything loads
    file = _copy_release(exported["sd3.5-medium"], tmp_path / "rel")
    clip = file.parent / "text_encoders" / "clip_g.safetensors"
    clip.write_bytes(clip.read_bytes()[:-10])
    with pytest.raises(ModelError, match=r"clip_g\.safetensors is not a valid \.safetensors file"):
        resolve_single_file(file, _config(tmp_path, tiny_family["sd3.5-medium"]))


def test_not_an_sd3_file(tiny_family, tmp_path):
    config = _config(tmp_path, tiny_family["sd3.5-medium"])
    path = tmp_path / "random.safetensors"
    save_file({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, str(path))
    with pytest.raises(ModelError, match=r"random\.safetensors is not an SD3/SD3\.5 transformer checkpoint.*joint_blocks"):
        detect_variant(path)
    clip = tmp_path / "clip_l.safetensors"
    shutil.copy(tiny_family["sd3.5-medium"] / "text_encoder" / "model.safetensors", clip)
    with pytest.raises(ModelError, match="looks like a CLIP text encoder"):
        resolve_single_file(clip, config)
    diffusers_layout = tmp_path / "transformer.safetensors"
    shutil.copy(tiny_family["sd3.5-medium"] / "transformer" / "diffusion_pytorch_model.safetensors", diffusers_layout)
    with pytest.raises(ModelError, match="diffusers layout"):
        ModelManager(config, placement=_cpu()).load(str(diffusers_layout))


def test_wrong_file_in_a_text_encoder_slot(tiny_family, exported, tmp_path):
    folder = tiny_family["sd3.5-medium"]
    file = _copy_release(exported["sd3.5-medium"], tmp_path / "rel")
    te = file.parent / "text_encoders"
    shutil.copy(te / "t5xxl_fp16.safetensors", te / "clip_l.safetensors")
    _, overrides = resolve_single_file(file, _config(tmp_path, folder))
    with pytest.raises(ModelError, match=r"clip_l\.safetensors does not fit the CLIP-L .* looks like a T5"):
        overrides["text_encoder"].load(_cpu())
    # same keys, other shapes (what clip_g in the clip_l slot looks like with the real sizes)
    clip = load_file(str(te / "clip_g.safetensors"))
    clip["text_projection.weight"] = torch.zeros(16, 32, dtype=torch.float16)
    save_file(clip, str(te / "clip_l.safetensors"))
    _, overrides = resolve_single_file(file, _config(tmp_path, folder))
    with pytest.raises(ModelError, match=r"shapes differ .*text_projection\.weight \[16, 32\] \(expected \[32, 32\]\)"):
        overrides["text_encoder"].load(_cpu())


def test_incomplete_transformer_is_an_error_not_random_weights(tiny_family, exported, tmp_path):
    folder = tiny_family["sd3-medium"]
    file = _copy_release(exported["sd3-medium"], tmp_path / "rel")
    tensors = load_file(str(file))
    del tensors["model.diffusion_model.final_layer.linear.weight"]
    save_file(tensors, str(file))
    _, overrides = resolve_single_file(file, _config(tmp_path, folder))
    with pytest.raises(ModelError, match="final_layer.linear.weight"):
        overrides["transformer"].load(_cpu())


def test_encoders_inside_the_file(tiny_family, exported, tmp_path):
    """SD3 Medium's "incl_clips" releases carry the encoders as text_encoders.<name>.transformer.*."""
    folder = tiny_family["sd3-medium"]
    src = exported["sd3-medium"]
    tensors = load_file(str(src))
    for name, prefix in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl_fp16", "t5xxl")):
        for k, v in load_file(str(src.parent / "text_encoders" / f"{name}.safetensors")).items():
            tensors[f"text_encoders.{prefix}.transformer.{k}"] = v
    file = tmp_path / "alone" / "sd3_medium_incl_clips_t5xxlfp16.safetensors"
    file.parent.mkdir()
    save_file(tensors, str(file))
    assert detect_variant(file) == "sd3-medium"
    _, overrides = resolve_single_file(file, _config(tmp_path, folder))
    assert all(overrides[c].file == file for c in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    manager = ModelManager(_config(tmp_path, folder), placement=_cpu())
    loaded = manager.load(str(file))
    image = loaded.pipe(PROMPT, generator=torch.Generator().manual_seed(7), **GEN).images[0]
    assert np.abs(image - _reference_images(folder)[1]).max() < 1e-5  # float32 rounding, as above


# --- ComfyUI's repacks: scaled fp8, the _scaled T5, clip/ folders --------------------------------


def _scaled_fp8(tensors: dict, prefix: str = "", marker: bool = True, with_input_scale: bool = False) -> dict:
    """ComfyUI's "scaled fp8" layout of a state dict: every matrix under ``prefix`` stored as
    float8_e4m3fn of w / scale with ``<layer>.scale_weight`` = absmax / 448 (float32 scalar), the
    rest left as it is, and a ``scaled_fp8`` marker tensor (Comfy-Org's sd3.5_large_fp8_scaled)."""
    out = {}
    for k, v in tensors.items():
        if k.startswith(prefix) and k.endswith(".weight") and v.ndim == 2 and v.is_floating_point():
            scale = v.float().abs().max().clamp(min=1e-12) / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
            if with_input_scale:
                out[k[: -len("weight")] + "scale_input"] = torch.ones(())
        else:
            out[k] = v
    if marker:
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


@pytest.fixture(scope="module")
def scaled_release(exported, tmp_path_factory):
    """sd3.5_medium_fp8_scaled.safetensors (transformer in scaled fp8, VAE as is) + the release's text encoders."""
    src = exported["sd3.5-medium"]
    dest = tmp_path_factory.mktemp("scaled") / "sd3.5_medium_fp8_scaled.safetensors"
    save_file(_scaled_fp8(load_file(str(src)), "model.diffusion_model.", with_input_scale=True), str(dest))
    shutil.copytree(src.parent / "text_encoders", dest.parent / "text_encoders")
    return dest


def test_scaled_fp8_checkpoint_is_dequantized_with_its_scales(tiny_family, scaled_release, tmp_path):
    folder = tiny_family["sd3.5-medium"]
    info = inspect_file(scaled_release)
    assert info.variant == "sd3.5-medium" and info.scaled_fp8 == "F8_E4M3"
    storage = info.storage
    orig = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    n_params = sum(v.numel() for v in orig.values())
    assert storage["params"] == n_params, "the planner counts every weight, none of the scales"
    assert storage["scaled_fp8"] and storage["scaled_matrices"] == sum(1 for k in info.scales())
    raw = load_file(str(scaled_release))
    assert set(storage["by_dtype"]) == {"F8_E4M3", "F32"}
    assert storage["by_dtype"]["F8_E4M3"] == sum(v.numel() for v in raw.values() if v.dtype == torch.float8_e4m3fn)
    assert storage["transformer_bytes"] == sum(v.numel() * v.element_size() for k, v in raw.items()
                                               if k.startswith("model.diffusion_model."))

    _, overrides = resolve_single_file(scaled_release, _config(tmp_path, folder))
    model = overrides["transformer"].load(_cpu())
    sd = model.state_dict()
    # exactly ComfyUI's dequantization: one matrix, checked by hand
    q = raw["model.diffusion_model.joint_blocks.1.x_block.mlp.fc1.weight"]
    s = raw["model.diffusion_model.joint_blocks.1.x_block.mlp.fc1.scale_weight"]
    assert torch.equal(sd["transformer_blocks.1.ff.net.0.proj.weight"], q.float() * s)
    # every weight within fp8 rounding (e4m3: 3 mantissa bits, 2^-4 relative) of the original
    for k, v in orig.items():
        assert (sd[k] - v).abs().max() <= v.abs().max() * 2**-4 + 1e-12, k

    # the output: close to the original model, while ignoring the scales (what loading did
    # before) is garbage
    from diffusers import SD3Transformer2DModel

    ref = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 16, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
             pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500.0]))
    unscaled = SD3Transformer2DModel.from_single_file(
        {k: (v.float() if v.dtype == torch.float8_e4m3fn else v) for k, v in raw.items()
         if k.startswith("model.") and not k.endswith(("scale_weight", "scale_input", "scaled_fp8"))},
        config=str(folder), subfolder="transformer", local_files_only=True).eval()
    with torch.no_grad():
        want = ref(**x).sample
        rel = float((model(**x).sample - want).abs().max() / want.abs().max())
        rel_unscaled = float((unscaled(**x).sample - want).abs().max() / want.abs().max())
    assert rel < 0.1, f"scaled fp8 vs the original transformer: {rel:.3f} relative"
    assert not rel_unscaled <= 10 * rel, f"ignoring the scales gives {rel_unscaled} (nan counts as garbage)"


def test_scaled_fp8_checkpoint_generates_close_to_the_folder(tiny_family, scaled_release, tmp_path):
    folder = tiny_family["sd3.5-medium"]
    manager = ModelManager(_config(tmp_path, folder), placement=_cpu())
    loaded = manager.load(str(scaled_release))
    image = loaded.pipe(PROMPT, generator=torch.Generator().manual_seed(7), **GEN).images[0]
    _, rounded = _reference_images(folder)
    diff = float(np.abs(image - rounded).mean())
    assert diff < 0.02, f"mean abs pixel difference {diff:.4f} (of 1.0) against the folder"
    assert np.isfinite(image).all()


def test_unknown_tensors_in_a_single_file_are_named(tiny_family, exported, tmp_path):
    folder = tiny_family["sd3.5-medium"]
    tensors = load_file(str(exported["sd3.5-medium"]))
    extra = {
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.comfy_quant": torch.zeros(4, dtype=torch.uint8),
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight_scale": torch.ones(()),
        "model.diffusion_model.some_new_embedder.weight": torch.zeros(4, 4),
        "first_stage_model.decoder.mid.block_1.extra_norm.weight": torch.zeros(4),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4),
        "model.diffusion_model.joint_blocks.0.x_block.attn.nothing.scale_weight": torch.ones(()),
    }
    file = _copy_release(exported["sd3.5-medium"], tmp_path / "rel")
    save_file({**tensors, **extra}, str(file))
    with pytest.raises(ModelError) as e:
        resolve_single_file(file, _config(tmp_path, folder))
    msg = str(e.value)
    assert "sd3.5_medium.safetensors holds 6 tensors the studio does not understand" in msg
    for k in sorted(extra)[:5]:
        assert k in msg
    # the official file itself passes, and so does a scaled one (scale_input included)
    resolve_single_file(exported["sd3.5-medium"], _config(tmp_path, folder))


def test_comfyui_scaled_t5_and_clip_folders(tiny_family, exported, tmp_path):
    """models/checkpoints/x.safetensors + models/clip/{clip_l, clip_g, t5xxl_fp8_e4m3fn_scaled}:
    ComfyUI's recommended T5, found in ComfyUI's folder and loaded with its scales."""
    from transformers import T5EncoderModel

    folder = tiny_family["sd3.5-large"]
    root = tmp_path / "models"
    file = _copy_release(exported["sd3.5-large"], root / "checkpoints", text_encoders=())
    te = exported["sd3.5-large"].parent / "text_encoders"
    (root / "clip").mkdir()
    for name in ("clip_l", "clip_g"):
        shutil.copy(te / f"{name}.safetensors", root / "clip")
    t5 = load_file(str(folder / "text_encoder_3" / "model.safetensors"))
    save_file(_scaled_fp8({k: v.half() for k, v in t5.items()}), str(root / "clip" / "t5xxl_fp8_e4m3fn_scaled.safetensors"))

    _, overrides = resolve_single_file(file, _config(tmp_path, folder))
    assert overrides["text_encoder"].file == root / "clip" / "clip_l.safetensors"
    assert overrides["text_encoder_3"].file.name == "t5xxl_fp8_e4m3fn_scaled.safetensors"
    model = overrides["text_encoder_3"].load(_cpu())
    ref = T5EncoderModel.from_pretrained(folder / "text_encoder_3")
    ids = torch.tensor([[3, 4, 5, 6, 1]])
    with torch.no_grad():
        out, want = model(ids).last_hidden_state, ref(ids).last_hidden_state
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(), want.flatten(), dim=0))
    assert cos > 0.995, f"scaled fp8 T5 vs the original: cosine {cos:.4f}"
    q = model.state_dict()["encoder.block.0.layer.0.SelfAttention.q.weight"]
    assert (q - t5["encoder.block.0.layer.0.SelfAttention.q.weight"]).abs().max() < 0.1 * t5[
        "encoder.block.0.layer.0.SelfAttention.q.weight"].abs().max(), "the scale was applied"

    # clip/ beside the checkpoint is searched too, before the parent's folders
    (root / "checkpoints" / "clip").mkdir()
    shutil.copy(te / "clip_l.safetensors", root / "checkpoints" / "clip")
    _, overrides = resolve_single_file(file, _config(tmp_path, folder))
    assert overrides["text_encoder"].file == root / "checkpoints" / "clip" / "clip_l.safetensors"
