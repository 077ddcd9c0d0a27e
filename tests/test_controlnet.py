"""ControlNets: catalog, loading (both layouts), the pipeline, preprocessors and the planner's sizes.

Offline and on CPU: the tiny family's transformers give tiny ControlNets in the designs of the
real ones (studio.demo.controlnet); tests/controlnet_kit.py writes Stability's single-file layout.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from studio.control_catalog import (
    CONTROL_TYPES,
    CONTROLNETS,
    PREPROCESSORS,
    check_fit,
    check_pair,
    controlnet_config,
    family_of,
    rule_for,
)
from studio.errors import ModelError, ValidationError

SIZE = 64  # px: 8×8 latents, 16 patches — every call well under a second


@pytest.fixture(scope="module")
def bases(tiny_family):
    """The tiny SD3 Medium (InstantX design) and SD3.5 Large (Stability's 8B design) pipelines."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    out = {}
    for v in ("sd3-medium", "sd3.5-large"):
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_family[v], torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        out[v] = pipe
    return out


@pytest.fixture(scope="module")
def tiny_nets(tiny_family, tmp_path_factory):
    """{variant: folder} of the demo's tiny ControlNets (diffusers layout)."""
    from studio.demo.controlnet import build_tiny_controlnets

    return build_tiny_controlnets(tmp_path_factory.mktemp("cn"),
                                  {v: tiny_family[v] for v in ("sd3-medium", "sd3.5-large")})


@pytest.fixture
def library(tmp_path):
    from studio.models.controlnet import ControlNetLibrary
    from studio.models.identity import HashCache

    return ControlNetLibrary(HashCache(tmp_path / "hashes.json"))


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _photo(size=SIZE, seed=0):
    """A deterministic picture with edges: a bright disc and a dark bar on a gradient."""
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    grad = np.linspace(40, 200, size, dtype=np.float32)[None, :, None].repeat(size, 0).repeat(3, 2)
    img = Image.fromarray((grad + rng.rand(size, size, 3) * 10).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse((size * 0.2, size * 0.2, size * 0.6, size * 0.6), fill=(250, 240, 230))
    d.rectangle((size * 0.65, size * 0.1, size * 0.8, size * 0.9), fill=(10, 20, 30))
    return img


def _run(pipe, seed=7, **kwargs):
    import torch

    from studio.engine.control import control_rng

    with control_rng(seed):
        out = pipe(prompt="a red fox", negative_prompt="", num_inference_steps=2, guidance_scale=4.0, height=SIZE,
                   width=SIZE, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs)
    return out.images[0]


def _control(variant, kind="canny"):
    from studio.control_catalog import SIGNED
    from studio.engine.control import ControlSettings, control_map, encode_map

    rule = CONTROLNETS["sd3.5-large-canny"].rule if variant == "sd3.5-large" else SIGNED
    return encode_map(control_map(_photo(), ControlSettings(kind), rule, SIZE, SIZE), rule)


# --- the catalog ---------------------------------------------------------------------------------


def test_catalog_entries_are_consistent():
    from studio.catalog import VARIANTS

    assert {"sd3.5-large-canny", "sd3.5-large-depth", "sd3.5-large-blur", "sd3-medium-canny", "sd3-medium-pose",
            "sd3-medium-tile", "sd3-medium-depth", "sd3-medium-inpaint"} <= set(CONTROLNETS)
    for e in CONTROLNETS.values():
        assert e.control_type in CONTROL_TYPES and e.preprocessor in PREPROCESSORS
        assert set(e.bases) <= set(VARIANTS), e.id
        assert set(e.bases) <= set(family_of(e.config)), f"{e.id}: the structure says {family_of(e.config)}"
        assert 0.0 <= e.start < e.end <= 1.0 and 0 < e.scale <= 2
        assert e.sources, f"{e.id} says nowhere where its numbers come from"
        assert e.inpaint == (e.config["extra_conditioning_channels"] == 1)
    large = CONTROLNETS["sd3.5-large-canny"]
    assert large.single_file == "sd3.5_large_controlnet_canny.safetensors"
    assert large.single_file_repo == "stabilityai/stable-diffusion-3.5-controlnets"
    assert CONTROLNETS["sd3-medium-inpaint"].repo_id == "alimama-creative/SD3-Controlnet-Inpainting"
    # the canny model reads x*255*0.5+0.5, the depth model near = dark; the rest 2x-1
    assert large.rule.encoding == "sd35-canny" and CONTROLNETS["sd3.5-large-depth"].rule.invert
    assert CONTROLNETS["sd3-medium-depth"].rule.invert is False
    # a ControlNet outside the catalog gets Stability's rules only in Stability's design
    assert rule_for("canny", controlnet_config("sd3.5-large-blur")).encoding == "sd35-canny"
    assert rule_for("canny", controlnet_config("sd3-medium-canny")).encoding == "signed"


def test_a_mismatched_pair_is_refused_naming_the_pairs_that_work():
    assert check_pair("sd3.5-large-canny", "sd3.5-large-turbo").id == "sd3.5-large-canny"
    with pytest.raises(ValidationError) as e:
        check_pair("sd3.5-large-canny", "sd3-medium")
    msg = str(e.value)
    assert e.value.field == "controlnet"
    assert "SD3.5 Large" in msg and "SD3 Medium" in msg
    assert "sd3-medium-canny" in msg and "sd3-medium-inpaint" in msg  # what fits this base
    assert "sd3.5-large-depth" in msg  # and the pairs that work
    with pytest.raises(ValidationError, match="no ControlNet for SD3.5 Medium"):
        check_pair("sd3-medium-canny", "sd3.5-medium")
    with pytest.raises(ValidationError, match="Unknown ControlNet"):
        check_pair("nope", "sd3-medium")


def test_a_controlnet_outside_the_catalog_is_checked_by_its_shape(bases, tiny_nets):
    import json

    large = json.loads((tiny_nets["sd3.5-large"] / "config.json").read_text())
    medium = json.loads((tiny_nets["sd3-medium"] / "config.json").read_text())
    check_fit(large, "sd3.5-large", dict(bases["sd3.5-large"].transformer.config))
    check_fit(medium, "sd3-medium", dict(bases["sd3-medium"].transformer.config))
    with pytest.raises(ValidationError, match="width") as e:
        check_fit(large, "sd3-medium", dict(bases["sd3-medium"].transformer.config), "tiny-large")
    assert e.value.field == "controlnet" and "sd3-medium-canny" in str(e.value)
    # same shapes, other base: built for SD3 Medium, refused on SD3.5 Medium
    with pytest.raises(ValidationError, match="built for SD3 Medium"):
        check_fit(controlnet_config("sd3-medium-canny"), "sd3.5-medium",
                  {**controlnet_config("sd3-medium-canny"), "num_layers": 24})


# --- the planner: real configs on the meta device ----------------------------------------------


def test_planner_configs_count_the_published_sizes_on_the_meta_device():
    """Each catalog config, built on the meta device, holds exactly the bytes the Hub lists for
    its diffusers weights (parameters + saved buffers × the dtype they were published in)."""
    from diffusers import SD3ControlNetModel

    from studio.memory.bytes import build_meta_model, count_params

    width = {"fp32": 4, "fp16": 2, "bf16": 2}
    for e in CONTROLNETS.values():
        model = build_meta_model(SD3ControlNetModel, controlnet_config(e.id))
        assert next(model.parameters()).is_meta
        stored = sum(t.numel() for t in model.state_dict().values())
        gb, dtype = e.published
        assert round(stored * width[dtype] / 1e9, 2) == gb, (e.id, stored)
        if e.id.startswith("sd3.5-large"):
            # 2.15B parameters: the 8.61 GB file is fp32 (4.3 GB in bf16), not bf16
            assert count_params(model) == stored == 2_153_518_976
    assert count_params(build_meta_model(SD3ControlNetModel, controlnet_config("sd3-medium-canny"))) == 538_805_760


# --- loading: both layouts, identity, cache -------------------------------------------------------


def test_tiny_controlnets_load_identically_from_both_layouts(bases, tiny_nets, library, tmp_path):
    """Stability's single file (our key conversion) and the diffusers folder give the same
    weights; so do a diffusers-key single file and its folder (the InstantX design)."""
    from diffusers import SD3ControlNetModel

    from studio.models.controlnet import stability_to_diffusers
    from tests.controlnet_kit import diffusers_to_stability, save_diffusers_file, save_stability_file

    t_large = bases["sd3.5-large"].transformer
    folder = library.get(str(tiny_nets["sd3.5-large"]))
    reference = SD3ControlNetModel.from_pretrained(tiny_nets["sd3.5-large"])
    assert _same_weights(_state(folder.model), _state(reference))
    file = save_stability_file(reference, tmp_path / "sd3.5_large_controlnet_canny.safetensors", 1, t_large)
    single = library.get(str(file), base_config=dict(t_large.config))
    assert _same_weights(_state(single.model), _state(folder.model))
    unused = {"caption_projection_dim"}  # no context embedder in the 8B design: not in the weights
    assert {k: single.config[k] for k in reference.config if not k.startswith("_") and k not in unused} == \
           {k: v for k, v in reference.config.items() if not k.startswith("_") and k not in unused}
    assert single.info["layout"] == "stability" and single.control_type == "canny"
    assert {"control_type", "pos_embed.proj.weight", "pos_embed.proj.bias"} <= set(single.info["ignored"])
    assert single.entry is CONTROLNETS["sd3.5-large-canny"]  # known by its release file name
    # the conversion is exactly invertible
    back, _ = stability_to_diffusers(diffusers_to_stability(_state(reference)))
    assert _same_weights(back, _state(reference))

    medium = library.get(str(tiny_nets["sd3-medium"]))
    one_file = save_diffusers_file(medium.model, tmp_path / "instantx-style.safetensors")
    again = library.get(str(one_file), base_config=dict(bases["sd3-medium"].transformer.config))
    assert again.info["layout"] == "diffusers"
    assert _same_weights(_state(again.model), _state(medium.model))
    assert again.config["use_pos_embed"] and again.config["joint_attention_dim"] == 64


def test_controlnets_are_known_by_content_and_cached(tiny_nets, library, tmp_path):
    import shutil

    import torch

    a = library.get(str(tiny_nets["sd3-medium"]), dtype=torch.float32)
    assert library.get(str(tiny_nets["sd3-medium"]), dtype=torch.float32) is a
    assert a.sha256 == library.hashes.folder_identity(tiny_nets["sd3-medium"])
    copy = shutil.copytree(tiny_nets["sd3-medium"], tmp_path / "renamed")
    assert library.get(str(copy), dtype=torch.float32) is a  # same content, another path: same object
    bf16 = library.get(str(tiny_nets["sd3-medium"]), dtype=torch.bfloat16)
    assert bf16 is not a and next(bf16.model.parameters()).dtype == torch.bfloat16
    library.get(str(tiny_nets["sd3.5-large"]))
    assert len(library.cached()) == 2  # the small RAM cache keeps the two most recent
    file = tmp_path / "x.safetensors"
    from tests.controlnet_kit import save_diffusers_file

    save_diffusers_file(a.model, file)
    loaded = library.get(str(file), base_config={"attention_head_dim": 8, "sample_size": 32})
    assert loaded.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    with pytest.raises(ModelError, match="head count"):  # 32 wide: not 64-wide heads, and no base given
        from studio.models.controlnet import config_from_header, file_layout
        from studio.models.singlefile import read_header

        config_from_header(read_header(file), file_layout(read_header(file)))


def test_sources_refuse_what_cannot_load_safely(tmp_path):
    from studio.models.controlnet import file_layout, parse_controlnet_source

    src = parse_controlnet_source("sd3.5-large-depth")
    assert (src.kind, src.ref, src.entry.id) == ("hub", "stabilityai/stable-diffusion-3.5-large-controlnet-depth",
                                                 "sd3.5-large-depth")
    assert parse_controlnet_source("InstantX/SD3-Controlnet-Tile").entry.id == "sd3-medium-tile"
    assert parse_controlnet_source("someone/other-controlnet").entry is None
    (tmp_path / "cn.ckpt").write_bytes(b"x")
    with pytest.raises(ModelError, match="pickled"):
        parse_controlnet_source(str(tmp_path / "cn.ckpt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        parse_controlnet_source(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="not an SD3 ControlNet"):
        file_layout(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"])


def test_a_controlnet_missing_offline_says_how_to_get_it(library, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as e:
        library.get("sd3-medium-canny")
    assert "hf download InstantX/SD3-Controlnet-Canny" in str(e.value)


# --- the pipeline ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sd3-medium", "sd3.5-large"])
def test_scale_zero_is_the_base_image_pixel_for_pixel_and_scale_one_is_not(variant, bases, tiny_nets, library):
    """A zero scale multiplies every ControlNet residual by 0, and x + 0 = x exactly; the
    control image's VAE sample draws from the global RNG, not the generator: the latents and
    every step are the base pipeline's."""
    import torch

    from studio.models.controlnet import pipeline_for

    base = bases[variant]
    net = library.get(str(tiny_nets[variant]), dtype=torch.float32)
    pipe = pipeline_for(base, [net], torch.float32)
    control = _control(variant)
    reference = _run(base)
    zero = _run(pipe, control_image=control, controlnet_conditioning_scale=0.0)
    assert np.array_equal(zero, reference)
    one = _run(pipe, control_image=control, controlnet_conditioning_scale=1.0)
    assert np.abs(one - reference).mean() > 1e-3
    # control end 0 switches it off for every step, too
    off = _run(pipe, control_image=control, controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
               control_guidance_end=1e-6)
    assert np.array_equal(off, reference)


def test_one_seed_gives_one_image_with_a_controlnet(bases, tiny_nets, library):
    """diffusers samples the control latents from the global RNG: control_rng pins it to the
    seed (and restores it), so the same seed gives the same image whatever ran before."""
    import torch

    from studio.models.controlnet import pipeline_for

    pipe = pipeline_for(bases["sd3-medium"], [library.get(str(tiny_nets["sd3-medium"]))], torch.float32)
    kwargs = dict(control_image=_control("sd3-medium"), controlnet_conditioning_scale=1.0)
    torch.manual_seed(1)
    first = _run(pipe, **kwargs)
    after = torch.random.get_rng_state()
    torch.manual_seed(2)
    assert np.array_equal(_run(pipe, **kwargs), first)
    torch.manual_seed(1)
    _run(pipe, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), after)  # the global state is left as it was

    def unpinned(global_seed):
        torch.manual_seed(global_seed)
        out = pipe(prompt="a red fox", num_inference_steps=2, guidance_scale=4.0, height=SIZE, width=SIZE,
                   generator=torch.Generator("cpu").manual_seed(7), output_type="np", **kwargs)
        return out.images[0]

    assert not np.array_equal(unpinned(1), unpinned(2))  # why it is needed


def test_two_controlnets_combine_one_scale_each(bases, tiny_family, tmp_path):
    import copy

    import torch
    from diffusers import SD3MultiControlNetModel, SD3Transformer2DModel

    from studio.demo.controlnet import build_tiny_controlnet
    from studio.engine.control import control_kwargs
    from studio.models.controlnet import pipeline_for

    base = bases["sd3-medium"]
    t = SD3Transformer2DModel.from_pretrained(tiny_family["sd3-medium"], subfolder="transformer")
    a = build_tiny_controlnet(t, "sd3-medium")  # 2 blocks
    same_depth = copy.deepcopy(a)
    shallow = build_tiny_controlnet(t, "sd3-medium", num_layers=1)  # 1 block (InstantX canny 6 vs depth 12)
    with torch.no_grad():
        for net in (same_depth, shallow):
            for p in net.controlnet_blocks.parameters():
                p.mul_(-3.0)
    canny, blur = _control("sd3-medium", "canny"), _control("sd3-medium", "blur")
    alone = _run(pipeline_for(base, [a], torch.float32), **control_kwargs([canny], [0.8], [0.0], [1.0]))
    for b in (same_depth, shallow):
        multi = pipeline_for(base, [a, b], torch.float32)
        assert isinstance(multi.controlnet, SD3MultiControlNetModel)
        with_b_off = _run(multi, **control_kwargs([canny, blur], [0.8, 0.0], [0.0, 0.0], [1.0, 1.0]))
        both = _run(multi, **control_kwargs([canny, blur], [0.8, 0.8], [0.0, 0.0], [1.0, 1.0]))
        assert np.array_equal(with_b_off, alone)  # each ControlNet has its own scale
        assert np.abs(both - alone).mean() > 1e-3  # and the second one adds its own residuals
    # why the studio aligns nets of different depths: diffusers' own multi-ControlNet zips their
    # outputs, dropping the deeper net's extra blocks and moving the rest onto other blocks
    plain = pipeline_for(base, [a], torch.float32)
    plain.controlnet = SD3MultiControlNetModel([a, shallow])
    assert not np.array_equal(_run(plain, **control_kwargs([canny, blur], [0.8, 0.0], [0.0, 0.0], [1.0, 1.0])), alone)
    with pytest.raises(ValidationError, match="before control end"):
        control_kwargs([canny], [1.0], [0.6], [0.4])


def test_pipeline_shares_the_base_components_and_the_position_embedding(bases, tiny_nets, library):
    import torch

    from studio.models.controlnet import pipeline_for

    base = bases["sd3.5-large"]
    net = library.get(str(tiny_nets["sd3.5-large"]), dtype=torch.float32)
    assert net.model.pos_embed is None or net.model.pos_embed is not base.transformer.pos_embed
    pipe = pipeline_for(base, [net], torch.float32)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "scheduler"):
        assert getattr(pipe, name) is getattr(base, name), name
    assert pipe.controlnet.pos_embed is base.transformer.pos_embed  # the 8B design reuses it
    unshared = pipeline_for(base, [net], torch.float32, share_pos_embed=False)
    assert unshared.controlnet.pos_embed is not base.transformer.pos_embed  # diffusers' own copy
    assert torch.equal(unshared.controlnet.pos_embed.pos_embed, base.transformer.pos_embed.pos_embed)


def test_fp8_transformer_takes_a_controlnet_and_keeps_its_storage(tiny_family, tiny_nets, library):
    """Layerwise fp8 storage survives building the ControlNet pipeline (from_pipe(dtype=) would
    cast it back to bf16) and the pair generates."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from studio.models.controlnet import controlnet_blocker, pipeline_for

    base = StableDiffusion3Pipeline.from_pretrained(tiny_family["sd3-medium"], torch_dtype=torch.bfloat16)
    base.set_progress_bar_config(disable=True)
    base.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    net = library.get(str(tiny_nets["sd3-medium"]), dtype=torch.bfloat16)
    assert controlnet_blocker(base, [net.config]) is None
    pipe = pipeline_for(base, [net], torch.bfloat16)
    q = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert q.dtype == torch.float8_e4m3fn
    image = _run(pipe, control_image=_control("sd3-medium").to(torch.bfloat16), controlnet_conditioning_scale=1.0)
    assert image.shape == (SIZE, SIZE, 3) and np.isfinite(image).all()


def test_blocker_names_what_cannot_take_a_controlnet(bases):
    from studio.models.controlnet import controlnet_blocker

    base = bases["sd3.5-large"]
    eight_b, joint = controlnet_config("sd3.5-large-canny"), controlnet_config("sd3-medium-canny")
    assert controlnet_blocker(base, [eight_b]) is None

    class Spread:  # a pipeline placed by device_map over several GPUs
        hf_device_map = {"transformer": 0, "text_encoder_3": 1}
        transformer = base.transformer

    assert "several GPUs" in controlnet_blocker(Spread(), [joint])

    class Sequential:  # sequential offload leaves the transformer's weights on the meta device
        def __init__(self):
            import copy

            self.transformer = copy.deepcopy(base.transformer).to("meta")

    assert "position embedding" in controlnet_blocker(Sequential(), [eight_b])
    assert controlnet_blocker(Sequential(), [joint]) is None  # InstantX's carry their own


def test_inpainting_controlnet_runs_through_the_inpainting_pipeline(bases, tiny_family):
    import torch
    from diffusers import SD3Transformer2DModel
    from PIL import Image

    from studio.demo.controlnet import build_tiny_controlnet
    from studio.engine.control import control_kwargs
    from studio.models.controlnet import pipeline_for

    t = SD3Transformer2DModel.from_pretrained(tiny_family["sd3-medium"], subfolder="transformer")
    net = build_tiny_controlnet(t, "sd3-medium", extra_channels=1)
    pipe = pipeline_for(bases["sd3-medium"], [net], torch.float32, inpaint=True)
    assert type(pipe).__name__ == "StableDiffusion3ControlNetInpaintingPipeline"
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    kwargs = control_kwargs([], [0.95], [0.0], [1.0], inpaint=(_photo(), mask))
    image = _run(pipe, **kwargs)
    assert image.shape == (SIZE, SIZE, 3)
    assert np.array_equal(_run(pipe, **{**kwargs, "controlnet_conditioning_scale": 0.0}), _run(bases["sd3-medium"]))


# --- preprocessors -------------------------------------------------------------------------------


def test_canny_preview_is_deterministic_and_follows_its_thresholds():
    from studio.control_catalog import SIGNED
    from studio.engine.control import ControlSettings, control_map

    photo = _photo(96)
    a = control_map(photo, ControlSettings("canny", 100, 200), SIGNED, 80, 64)
    b = control_map(_photo(96), ControlSettings("canny", 100, 200), SIGNED, 80, 64)
    assert a.size == (80, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    pixels = np.asarray(a)
    assert set(np.unique(pixels)) <= {0, 255} and 0 < (pixels == 255).mean() < 0.5  # white edges on black
    loose = np.asarray(control_map(photo, ControlSettings("canny", 5, 20), SIGNED, 80, 64))
    assert (loose == 255).sum() > (pixels == 255).sum()
    with pytest.raises(ValidationError) as e:
        ControlSettings("canny", 200, 100).checked()
    assert e.value.field == "canny_low"
    with pytest.raises(ValidationError, match="preprocessor"):
        ControlSettings("sketch").checked()


def test_each_model_gets_its_own_input_transform():
    from PIL import Image

    from studio.control_catalog import SIGNED
    from studio.engine.control import ControlSettings, control_map, encode_map

    white_on_black = Image.new("RGB", (32, 32), 0)
    white_on_black.paste((255, 255, 255), (0, 0, 16, 32))
    sai = CONTROLNETS["sd3.5-large-canny"].rule
    t = encode_map(white_on_black, sai)
    assert t.shape == (1, 3, 32, 32)
    assert float(t[0, 0, 0, 0]) == 128.0 and float(t[0, 0, 0, 31]) == 0.5  # x*255*0.5+0.5, no normalising
    s = encode_map(white_on_black, SIGNED)
    assert float(s.max()) == 1.0 and float(s.min()) == -1.0
    # Stability's depth model reads near = dark: the studio's near = bright map is inverted
    depth_rule = CONTROLNETS["sd3.5-large-depth"].rule
    ready = _photo(32)
    seen = control_map(ready, ControlSettings("none"), depth_rule, 32, 32)
    assert np.array_equal(np.asarray(seen), 255 - np.asarray(ready))
    assert control_map(ready, ControlSettings("none", invert=False), depth_rule, 32, 32).tobytes() == ready.tobytes()
    blurred = control_map(ready, ControlSettings("blur", blur_radius=3), SIGNED, 32, 32)
    assert np.asarray(blurred).std() < np.asarray(ready).std()


def test_depth_preprocessor_with_a_tiny_local_model(tmp_path):
    from PIL import ImageOps

    from studio.control_catalog import SIGNED
    from studio.engine.control import ControlSettings, DepthEstimator, control_map
    from tests.controlnet_kit import build_tiny_depth_model

    folder = build_tiny_depth_model(tmp_path / "tiny-depth")
    estimator = DepthEstimator(str(folder))
    photo = _photo(96)
    near_bright = control_map(photo, ControlSettings("depth"), SIGNED, 80, 64, estimator)
    assert near_bright.size == (80, 64)
    d = np.asarray(near_bright)
    assert d.min() == 0 and d.max() == 255  # min–max normalised
    assert control_map(photo, ControlSettings("depth"), SIGNED, 80, 64, estimator).tobytes() == near_bright.tobytes()
    for_sai = control_map(photo, ControlSettings("depth"), CONTROLNETS["sd3.5-large-depth"].rule, 80, 64, estimator)
    assert for_sai.tobytes() == ImageOps.invert(near_bright).tobytes()


def test_a_missing_depth_model_offline_says_how_to_get_it(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from studio.control_catalog import SIGNED
    from studio.engine.control import DEPTH_MODEL, ControlSettings, DepthEstimator, control_map

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as e:
        control_map(_photo(), ControlSettings("depth"), SIGNED, SIZE, SIZE, DepthEstimator(DEPTH_MODEL))
    msg = str(e.value)
    assert f"hf download {DEPTH_MODEL}" in msg and "local folder" in msg and "'none'" in msg
    with pytest.raises(ModelError, match="does not exist"):
        DepthEstimator(str(tmp_path / "no-such-folder")).load()


def test_control_images_get_the_header_first_checks(tmp_path):
    from studio.engine.control import load_control_image

    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValidationError) as e:
        load_control_image(str(tmp_path / "bad.png"))
    assert e.value.field == "control_image" and "control image" in str(e.value)
    rgba = _photo().convert("RGBA")
    assert load_control_image(rgba).mode == "RGB"


# --- stored and placed with the transformer (the preset decides, Preset.apply_controlnet) ----------


@pytest.mark.parametrize("preset", ["model-offload", "group-offload"])
def test_a_controlnet_placed_as_the_preset_says_gives_the_same_image(preset, bases, tiny_nets, library):
    """On the CPU (the onload device is the CPU here; on a GPU the same hooks move it there):
    model offload hooks the net (handed back after the image), group offload streams it block
    by block — and neither changes the image."""
    import torch
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from studio.memory import get_preset
    from studio.models.controlnet import pipeline_for, release_controlnets

    p = get_preset(preset)
    base = bases["sd3-medium"]
    plain = library.get(str(tiny_nets["sd3-medium"]), dtype=torch.float32)
    reference = _run(pipeline_for(base, [plain], torch.float32), control_image=_control("sd3-medium"),
                     controlnet_conditioning_scale=1.0)
    net = library.get(str(tiny_nets["sd3-medium"]), dtype=torch.float32, setup=p.controlnet_key)
    assert net is not plain  # a net hooked for one preset is another cache entry
    pipe = pipeline_for(base, [net], torch.float32, preset=p)
    model = net.model
    assert model._studio_controlnet_key == p.controlnet_key
    if preset == "model-offload":
        assert model._studio_offload_hook is not None and hasattr(model, "_hf_hook")
    else:
        assert _is_group_offload_enabled(model)
    image = _run(pipe, control_image=_control("sd3-medium"), controlnet_conditioning_scale=1.0)
    release_controlnets([net])
    np.testing.assert_array_equal(image, reference)
    again = pipeline_for(base, [net], torch.float32, preset=p)  # set up once: a rebuild adds no hooks
    np.testing.assert_array_equal(_run(again, control_image=_control("sd3-medium"),
                                       controlnet_conditioning_scale=1.0), image)


def test_a_quantized_transformers_preset_stores_the_controlnet_in_fp8(tiny_family, tiny_nets, library):
    import torch
    from diffusers import StableDiffusion3Pipeline

    from studio.memory import get_preset
    from studio.models.controlnet import pipeline_for

    base = StableDiffusion3Pipeline.from_pretrained(tiny_family["sd3-medium"], torch_dtype=torch.bfloat16)
    base.set_progress_bar_config(disable=True)
    for name in ("nf4-t5-8bit", "fp8-model-offload"):
        p = get_preset(name)
        assert p.controlnet_storage().kind == "fp8"
        net = library.get(str(tiny_nets["sd3-medium"]), dtype=torch.bfloat16, setup=p.controlnet_key)
        pipe = pipeline_for(base, [net], torch.bfloat16, preset=p)
        assert net.model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
        image = _run(pipe, control_image=_control("sd3-medium").to(torch.bfloat16), controlnet_conditioning_scale=1.0)
        assert image.shape == (SIZE, SIZE, 3) and np.isfinite(image).all()


def test_model_offload_hands_the_controlnet_back_after_the_image(bases, tiny_nets, library):
    import torch

    from studio.memory import get_preset
    from studio.models.controlnet import pipeline_for, release_controlnets

    p = get_preset("model-offload")
    net = library.get(str(tiny_nets["sd3-medium"]), dtype=torch.float32, setup=p.controlnet_key)
    pipeline_for(bases["sd3-medium"], [net], torch.float32, preset=p)
    calls = []
    net.model._studio_offload_hook.offload = lambda: calls.append("offload")
    release_controlnets([net, net.model])
    assert calls == ["offload", "offload"]
