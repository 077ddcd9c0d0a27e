"""ControlNet wired end to end (#15): ``Studio.generate`` with one and several ControlNets (the
demo's tiny ones), the inpainting ControlNet through the inpainting pipeline, the refusals, the
metadata (Forge's infotext read back with an A1111-faithful parser), the control image stored by
content and deleted with the last image that uses it, "reuse parameters", ComfyUI's ControlNet
nodes, the preview, the API and the CLI.

The catalog, loading, the pipeline and the preprocessors are tested in test_controlnet.py; here
only the wiring. Tiny demo models, 256², 2 steps, SLG off."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from studio.engine import build_request
from studio.errors import ValidationError
from studio.metadata import fields_from_infotext, read_png_info
from tests.a1111_parser import parse_generation_parameters as a1111_parse

FAST = dict(steps=2, width=256, height=256, seed=9, slg="off")


def _photo(size=256):
    img = Image.new("RGB", (size, size), (40, 60, 80))
    d = ImageDraw.Draw(img)
    d.ellipse((size * 0.2, size * 0.2, size * 0.6, size * 0.6), fill=(250, 240, 230))
    d.rectangle((size * 0.65, size * 0.1, size * 0.8, size * 0.9), fill=(10, 20, 30))
    d.ellipse((size * 0.1, size * 0.7, size * 0.3, size * 0.9), fill=(52, 72, 92))  # faint: low thresholds only
    return img


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_family):
    from studio.config import StudioConfig
    from studio.service import Studio

    config = StudioConfig(data_dir=tmp_path_factory.mktemp("cn") / "data", demo=True)
    config.tiny_dir.parent.mkdir(parents=True)
    config.tiny_dir.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)
    return Studio(config)


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    path = tmp_path_factory.mktemp("control") / "photo.png"
    _photo().save(path)
    return str(path)


def _px(result):
    return np.asarray(result.images[0].image)


def test_scale_zero_is_the_base_image_a_control_steers_it_and_one_seed_is_one_image(studio, control):
    import torch

    base = studio.generate(build_request(dict(prompt="a red fox", **FAST)))
    zero = studio.generate(build_request(dict(prompt="a red fox", control_image=control, control_scale=0, **FAST)))
    assert np.array_equal(_px(zero), _px(base)), "scale 0 adds nothing: the base model's image to the pixel"
    assert type(studio.models._controlnet_pipe[2]).__name__ == "StableDiffusion3ControlNetPipeline"
    torch.manual_seed(1)
    one = studio.generate(build_request(dict(prompt="a red fox", control_image=control, **FAST)))
    assert not np.array_equal(_px(one), _px(base))
    torch.manual_seed(2)  # the control latents come from the global RNG: pinned to the seed
    again = studio.generate(build_request(dict(prompt="a red fox", control_image=control, **FAST)))
    assert np.array_equal(_px(again), _px(one))
    meta = one.images[0].metadata
    (unit,) = meta["controlnets"]
    assert (unit["type"], unit["preprocess"], unit["scale"], unit["start"], unit["end"]) == ("canny", "canny", 1.0, 0.0, 1.0)
    assert unit["name"] == "tiny-sd3.5-medium-canny" and len(unit["sha256"]) >= 32
    assert meta["slg"] is None


def test_two_controlnets_metadata_infotext_blobs_and_reuse(studio, tmp_path):
    control = str(tmp_path / "mine.png")  # a picture no other test's image names
    _photo().transpose(Image.Transpose.ROTATE_90).save(control)
    req = build_request(dict(prompt="a red fox", control_image=control, control_scale=0.7, canny_low=50,
                             canny_high=150, control_end=0.8,
                             controls=[dict(control_image=control, control_type="blur", blur_radius=4,
                                            control_scale=0.5, control_start=0.1)], **FAST))
    first = studio.generate(req)
    item = first.wait_saved()[0]
    units = first.images[0].metadata["controlnets"]
    assert [(u["type"], u["preprocess"], u["scale"], u["start"], u["end"]) for u in units] == \
        [("canny", "canny", 0.7, 0.0, 0.8), ("blur", "blur", 0.5, 0.1, 1.0)]
    assert (units[0]["canny_low"], units[0]["canny_high"], units[1]["blur_radius"]) == (50, 150, 4.0)
    sha = units[0]["control_image_sha256"]
    assert sha == units[1]["control_image_sha256"], "one picture, stored once"
    assert studio.blobs.controls.path(sha) is not None

    with Image.open(item.path) as im:
        params = a1111_parse(im.text["parameters"])
    cn0, cn1 = params["ControlNet 0"], params["ControlNet 1"]
    for words in ("Module: canny", "Model: tiny-sd3.5-medium-canny [", "Weight: 0.7", "Threshold A: 50",
                  "Threshold B: 150", "Guidance Start: 0", "Guidance End: 0.8"):
        assert words in cn0, (words, cn0)
    assert "Module: blur_gaussian" in cn1 and "Weight: 0.5" in cn1 and "Guidance Start: 0.1" in cn1
    back = fields_from_infotext(im.text["parameters"])["controlnets"]
    assert [(u["type"], u["scale"], u["start"], u["end"]) for u in back] == \
        [("canny", 0.7, 0.0, 0.8), ("blur", 0.5, 0.1, 1.0)]

    # reuse: every setting and both control images (by the gallery id) give the same image again
    fields, _ = studio.reuse_image(item.id)
    assert [u["control_type"] for u in fields["controls"]] == ["canny", "blur"]
    assert all(u["control_image"].endswith(f"{sha}.png") for u in fields["controls"])
    again = studio.generate(build_request(fields))
    assert np.array_equal(_px(again), _px(first))
    second = again.wait_saved()[0]

    # the control image goes with the last image that uses it
    studio.delete_image(item.id)
    assert studio.blobs.controls.path(sha) is not None, "the reused image still names it"
    studio.delete_image(second.id)
    assert studio.blobs.controls.path(sha) is None


def test_refusals_name_the_field_and_the_fix(studio, control, tiny_family, tmp_path):
    from studio.demo.controlnet import build_tiny_controlnets

    cases = [
        (dict(controlnet="sd3.5-large-canny"), "controlnet", "Pairs that work"),
        (dict(variant="sd3.5-large", controlnet="sd3.5-large-canny", control_type="depth"), "control_type",
         "is a canny ControlNet"),
        (dict(mode="img2img", init_image=_photo()), "controlnet", "no ControlNet img2img"),
        (dict(control_type="inpaint"), "control_type", "use inpaint mode"),
        (dict(controls=[dict(control_image=control)] * 3), "controls", "at most 3"),
        (dict(control_start=0.6, control_end=0.4), "control_start", "before control end"),
        (dict(control_type="sketch"), "control_type", "canny, depth, blur"),
    ]
    for fields, field, words in cases:
        with pytest.raises(ValidationError) as e:  # before any model is loaded
            studio.check_request(build_request(dict(prompt="x", control_image=control, **{**FAST, **fields})))
        assert e.value.field == field and words in str(e.value), (fields, str(e.value))
    with pytest.raises(ValidationError) as e:  # a control image gets the init images' header-first checks
        bad = tmp_path / "not-an-image.png"
        bad.write_bytes(b"not a png at all")
        studio.generate(build_request(dict(prompt="x", control_image=str(bad), **FAST)))
    assert e.value.field == "control_image" and "not an image" in str(e.value)
    with pytest.raises(ValidationError) as e:
        studio.generate(build_request(dict(prompt="x", controlnet="sd3.5-large-canny", **FAST)))
    assert e.value.field == "controlnet"
    # a ControlNet outside the catalog is checked by its shape: Stability's 8B design on Medium
    large_net = build_tiny_controlnets(tmp_path / "nets", {"sd3.5-large": tiny_family["sd3.5-large"]})["sd3.5-large"]
    with pytest.raises(ValidationError) as e:
        studio.generate(build_request(dict(prompt="x", control_image=control, controlnet=str(large_net), **FAST)))
    assert e.value.field == "controlnet" and "does not fit" in str(e.value)
    # a transformer that cannot take one is refused with the reason
    pipe = studio.current.pipe
    before = pipe.__dict__.get("hf_device_map")
    pipe.__dict__["hf_device_map"] = {"transformer": 0}  # as a device_map="balanced" load leaves it
    try:
        with pytest.raises(ValidationError) as e:
            studio.generate(build_request(dict(prompt="x", control_image=control, **FAST)))
    finally:
        pipe.__dict__["hf_device_map"] = before
    assert e.value.field == "controlnet" and "several GPUs" in str(e.value)
    # a shared studio takes catalog ids only
    studio.shared = True
    try:
        with pytest.raises(ValidationError, match="catalog only"):
            studio.check_controlnet_sources(build_request(dict(prompt="x", controlnet=str(large_net))))
        # every generation path (UI, API, CLI, ZeroGPU) goes through check_request, which checks it
        with pytest.raises(ValidationError, match="catalog only"):
            studio.generate(build_request(dict(prompt="x", controlnet=str(large_net), **FAST)))
    finally:
        studio.shared = False


def test_inpainting_controlnet_runs_through_the_inpainting_pipeline(studio, tiny_family, tmp_path):
    import torch
    from diffusers import SD3Transformer2DModel

    from studio.demo.controlnet import build_tiny_controlnet

    transformer = SD3Transformer2DModel.from_pretrained(tiny_family["sd3-medium"], subfolder="transformer")
    folder = tmp_path / "tiny-inpaint-controlnet"
    build_tiny_controlnet(transformer, "sd3-medium", extra_channels=1).save_pretrained(folder)
    source = _photo()
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 160, 160))
    result = studio.generate(build_request(dict(
        prompt="a red fox", mode="inpaint", variant="sd3-medium", init_image=source, mask_image=mask,
        control_type="inpaint", controlnet=str(folder), mask_blur=0, **FAST)))
    assert type(studio.models._controlnet_pipe[2]).__name__ == "StableDiffusion3ControlNetInpaintingPipeline"
    out = np.asarray(result.images[0].image)
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], np.asarray(source)[keep]), "away from the mask: the source's pixels"
    assert not np.array_equal(out[~keep], np.asarray(source)[~keep])
    meta = result.images[0].metadata
    assert meta["controlnets"][0]["type"] == "inpaint" and meta["strength"] is None
    assert meta["controlnets"][0]["control_image_sha256"] is None and meta["mask_sha256"]
    with pytest.raises(ValidationError) as e:  # none named: the demo has no inpainting ControlNet to default to
        studio.generate(build_request(dict(prompt="x", mode="inpaint", variant="sd3-medium", init_image=source,
                                           mask_image=mask, control_type="inpaint", **FAST)))
    assert e.value.field == "controlnet"
    del torch


def test_the_preview_is_the_map_the_engine_reads(studio, control, tmp_path):
    from studio.control_catalog import CONTROLNETS, SIGNED
    from studio.engine.control import ControlSettings, control_map, load_control_image
    from tests.controlnet_kit import build_tiny_depth_model

    preview = studio.control_preview(control, canny_low=10, canny_high=30)
    expected = control_map(load_control_image(control), ControlSettings("canny", 10, 30), SIGNED, 256, 256)
    assert np.array_equal(np.asarray(preview), np.asarray(expected))
    assert np.array_equal(np.asarray(studio.control_preview(control, canny_low=10, canny_high=30)),
                          np.asarray(preview)), "deterministic"
    assert np.asarray(studio.control_preview(control)).sum() < np.asarray(preview).sum(), \
        "the faint disc's edges only pass the low thresholds"
    # Stability's SD3.5 Large depth ControlNet reads near = dark: its preview is the usual map inverted
    depth = str(build_tiny_depth_model(tmp_path / "depth"))
    large = studio.control_preview(control, controlnet="sd3.5-large-depth", variant="sd3.5-large",
                                   depth_model=depth, width=256, height=256)
    medium = studio.control_preview(control, controlnet="sd3-medium-depth", variant="sd3-medium",
                                    depth_model=depth, width=256, height=256)
    assert CONTROLNETS["sd3.5-large-depth"].rule.invert
    assert np.array_equal(np.asarray(large), 255 - np.asarray(medium))
    with pytest.raises(ValidationError) as e:
        studio.control_preview(None)
    assert e.value.field == "control_image"


def test_comfyui_controlnet_nodes_are_read_and_reused(studio, tmp_path):
    graph = {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 5, "steps": 60, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
            "model": ["4", 0], "positive": ["12", 0], "negative": ["12", 1], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_large.safetensors"}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "9": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "10": {"class_type": "Canny", "inputs": {"image": ["9", 0], "low_threshold": 0.4, "high_threshold": 0.8}},
        "11": {"class_type": "ControlNetLoader",
               "inputs": {"control_net_name": "sd3.5_large_controlnet_canny.safetensors"}},
        "12": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "control_net": ["11", 0], "image": ["10", 0],
            "strength": 0.7, "start_percent": 0.0, "end_percent": 0.9, "vae": ["4", 2]}},
    }
    png = PngInfo()
    png.add_text("prompt", json.dumps(graph))
    path = tmp_path / "comfy.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png)
    info = read_png_info(path)
    assert info.fields["prompt"] == "a red fox"
    (unit,) = info.fields["controlnets"]
    assert unit == {"scale": 0.7, "start": 0.0, "end": 0.9, "name": "sd3.5-large-canny", "type": "canny",
                    "preprocess": "canny", "canny_low": 102, "canny_high": 204}
    fields, notes = studio.reuse_fields(info.fields, info.source)
    assert fields["controls"] == [{"control_type": "canny", "preprocess": "canny", "canny_low": 102,
                                   "canny_high": 204, "control_scale": 0.7, "control_start": 0.0,
                                   "control_end": 0.9, "controlnet": "sd3.5-large-canny"}]
    assert fields["variant"] == "sd3.5-large" and notes == []


# --- the API and the CLI --------------------------------------------------------------------------


def test_api_controlnet_preview_and_list(tmp_path_factory, tiny_family, control):
    gradio_client = pytest.importorskip("gradio_client")
    from gradio_client import handle_file

    from tests.conftest_ui import api_client, running_studio

    with running_studio(tmp_path_factory.mktemp("api15") / "data", tiny_family) as (url, _studio):
        client = api_client(url, tmp_path_factory.mktemp("dl15"))
        images, seed, info = client.predict(prompt="a red fox", control_image=handle_file(control),
                                            control_type="blur", control_scale=0.6, control_end=0.7,
                                            **FAST, api_name="/controlnet")
        with Image.open(images[0]) as im:
            (unit,) = json.loads(im.text["sd35studio"])["controlnets"]
        assert (unit["type"], unit["preprocess"], unit["scale"], unit["end"]) == ("blur", "blur", 0.6, 0.7)
        preview = client.predict(control_image=handle_file(control), control_type="canny", api_name="/control_preview")
        with Image.open(preview) as im:
            assert im.size == (256, 256)
        listing = client.predict(control_type="canny", api_name="/list_controlnets")
        assert [u["control_type"] for u in listing] == ["canny"]


def test_cli_control_flags(demo_config, control, capsys):
    from studio.app.cli import main

    code = main(["generate", "a red fox", "--demo", "--data-dir", str(demo_config.data_dir), "--steps", "2",
                 "--seed", "3", "--control-image", control, "--control-type", "tile", "--control-scale", "0.8",
                 "--no-preprocess"])
    out = capsys.readouterr()
    assert code == 0, out.err
    (unit,) = read_png_info(out.out.split()[0]).fields["controlnets"]
    assert (unit["type"], unit["preprocess"], unit["scale"]) == ("tile", "none", 0.8)
    assert main(["generate", "x", "--demo", "--data-dir", str(demo_config.data_dir), "--control-image", control,
                 "--controlnet", "sd3.5-large-canny"]) == 2
    assert "Pairs that work" in capsys.readouterr().err
