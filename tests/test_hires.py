"""Hires fix and upscaling, wired end to end (#17): the second pass in ``Studio.generate`` (image,
latent and model upscalers; another variant sharing the encoders with zero extra text-encoder
passes), progress across both passes, the metadata and A1111's infotext read back, reuse,
``Studio.upscale`` (gallery image by id or an upload, optional refine, a new entry naming its
parent), the API and the CLI.

The upscaler library and runner are tested in test_upscale.py; here only the wiring. Tiny demo
models at 256² (second passes at 384–512²), 2–3 steps."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from studio.engine import build_request
from studio.errors import GalleryError, ValidationError
from studio.metadata import fields_from_infotext, read_png_info
from tests.a1111_parser import parse_generation_parameters as a1111_parse

FAST = dict(steps=2, width=256, height=256, seed=5, slg="off")
TINY_ESRGAN = "tiny-esrgan-2x"


@pytest.fixture(scope="module")
def spandrel():
    from studio.models.upscalers import SPANDREL_REQUIREMENT, spandrel_module

    try:
        return spandrel_module()
    except Exception:  # noqa: BLE001 — not installed: these tests need it
        pytest.skip(f"spandrel is not installed: pip install --no-deps '{SPANDREL_REQUIREMENT}' 'einops>=0.7'")


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_family):
    from studio.config import StudioConfig
    from studio.service import Studio

    config = StudioConfig(data_dir=tmp_path_factory.mktemp("hires") / "data", demo=True)
    config.tiny_dir.parent.mkdir(parents=True)
    config.tiny_dir.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)
    return Studio(config)


def _infotext(path) -> str:
    with Image.open(path) as im:
        return im.text["parameters"]


def test_hires_fix_with_a_model_upscaler_end_to_end(studio, spandrel):
    events = []
    result = studio.generate(build_request(dict(prompt="a red fox", hires_scale=2, hires_steps=3,
                                                hires_upscaler=TINY_ESRGAN, **FAST)),
                             on_progress=events.append)
    item = result.images[0]
    assert item.image.size == (512, 512), "the second pass runs at 2× the first"
    meta = item.metadata
    assert (meta["width"], meta["height"], meta["hires_size"]) == (256, 256, [512, 512]), "Size is the first pass's"
    assert (meta["hires_scale"], meta["hires_steps"], meta["hires_denoise"], meta["hires_upscaler"]) == \
        (2.0, 3, 0.35, TINY_ESRGAN)
    info = studio.models.upscalers.info(TINY_ESRGAN)
    assert meta["upscaler"]["sha256"] == info.sha256 and meta["upscaler_hash"] == info.short_hash
    assert "hires fix to 512×512" in result.info

    # one bar over both passes: 2 first-pass steps, then the second's (3 steps at 0.35: diffusers runs 2)
    assert [(e.step, e.steps) for e in events] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert events[-1].latents.shape[-1] == 512 // 8, "the last preview is the second pass's"

    text = _infotext(item.path)
    params = a1111_parse(text)
    assert (params["Hires upscale"], params["Hires steps"], params["Hires upscaler"]) == ("2", "3", TINY_ESRGAN)
    assert params["Denoising strength"] == "0.35" and params["Size-1"] == "256"
    assert params["Hires upscaler hash"] == info.short_hash

    # reuse restores the hires settings (a txt2img, not an img2img) from the infotext alone
    fields, notes = studio.reuse_fields(fields_from_infotext(text), "a1111")
    assert notes == []
    assert fields["mode"] == "txt2img" and "strength" not in fields
    assert (fields["hires_scale"], fields["hires_steps"], fields["hires_denoise"], fields["hires_upscaler"]) == \
        (2.0, 3, 0.35, TINY_ESRGAN)
    again = studio.engine.prepare(build_request(fields), studio.current)
    assert (again.hires.width, again.hires.height, again.hires.info.sha256) == (512, 512, info.sha256)
    # an A1111 upscaler this studio does not have is reported, and Lanczos is used
    fields, notes = studio.reuse_fields(fields_from_infotext(text.replace(TINY_ESRGAN, "4x-UltraSharp")), "a1111")
    assert "hires_upscaler" not in fields and any("'4x-UltraSharp' is not in the upscalers folder" in n
                                                  for n in notes)


def test_large_then_medium_reuses_the_prompt_embeddings_zero_text_encoder_passes(studio, monkeypatch):
    """Stability's recipe: the second pass on another variant. Its text encoders and VAE are the
    very objects of the first; the prompt is encoded once, for the first pass only."""
    from studio.engine.run import Engine

    studio.load_model(variant="sd3.5-large")
    large = studio.current
    calls = {"text": 0, "vae_encode": 0}

    def count(kind):
        def hook(*_):
            calls[kind] += 1
        return hook

    hooks = [getattr(large.pipe, n).register_forward_hook(count("text"))
             for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    hooks.append(large.pipe.vae.encoder.register_forward_hook(count("vae_encode")))
    during_second = []
    real = Engine._hires

    def watched(self, r, loaded, second, *args, **kwargs):
        before = dict(calls)
        misses = self.prompt_cache.misses
        out = real(self, r, loaded, second, *args, **kwargs)
        during_second.append(({k: calls[k] - before[k] for k in calls}, self.prompt_cache.misses - misses,
                              second.variant.name, second.pipe.text_encoder is large.pipe.text_encoder,
                              second.pipe.vae is large.pipe.vae))
        return out

    monkeypatch.setattr(Engine, "_hires", watched)
    try:
        result = studio.generate(build_request(dict(
            prompt="a grey wolf at dusk", variant="sd3.5-large", hires_scale=1.5, hires_steps=2, hires_denoise=0.5,
            hires_upscaler="latent-bislerp", hires_variant="sd3.5-medium", batch_count=2, **FAST)))
    finally:
        for h in hooks:
            h.remove()
    assert calls["text"] > 0, "the first pass encoded the prompt"
    assert during_second == [({"text": 0, "vae_encode": 0}, 0, "sd3.5-medium", True, True)] * 2, \
        "each second pass: no text encoder, no VAE encode (latent upscale), no prompt-cache miss, shared modules"
    assert [i.image.size for i in result.images] == [(384, 384)] * 2
    meta = result.images[0].metadata
    assert (meta["variant"], meta["hires_variant"]) == ("sd3.5-large", "sd3.5-medium")
    assert studio.current.variant.name == "sd3.5-medium"
    assert any("second pass ran on SD3.5 Medium" in n for n in result.notes)
    params = a1111_parse(_infotext(result.images[0].path))
    assert (params["Hires checkpoint"], params["Hires upscaler"]) == ("sd3.5-medium", "Latent (bislerp)")
    fields, _ = studio.reuse_fields(read_png_info(result.images[0].path).fields, "studio")
    assert (fields["hires_variant"], fields["hires_upscaler"], fields["variant"]) == \
        ("sd3.5-medium", "latent-bislerp", "sd3.5-large")


def test_bad_hires_requests_are_refused_naming_the_field(studio):
    init = Image.new("RGB", (256, 256))
    for fields, field, words in (
        (dict(hires_scale=2.5, width=1024, height=1024), "hires_scale", "largest factor allowed for 1024×1024 is 2×"),
        (dict(hires_scale=5), "hires_scale", "between 1 and 4"),
        (dict(hires_scale=2, mode="img2img", init_image=init), "hires_scale", "txt2img and Turbo"),
        (dict(hires_scale=2, hires_steps=2, hires_denoise=0.3), "hires_steps", "at least 4 hires steps"),
        (dict(hires_scale=2, hires_variant="sd4"), "hires_variant", "Unknown hires variant"),
    ):
        with pytest.raises(ValidationError) as e:  # refused before any model is loaded or run
            studio.check_request(build_request(dict(prompt="x", steps=2, **fields)))
        assert e.value.field == field and words in str(e.value), (fields, str(e.value))
    with pytest.raises(ValidationError) as e:
        studio.generate(build_request(dict(prompt="x", hires_scale=2, hires_upscaler="no-such-model", **FAST)))
    assert e.value.field == "hires_upscaler" and "No upscaler named 'no-such-model'" in str(e.value)


def test_upscale_a_gallery_image_by_id_and_an_upload_with_a_refine_pass(studio, spandrel):
    base = studio.generate(build_request(dict(prompt="a red fox", **FAST), "txt2img"), owner="u:ann")
    parent = base.wait_saved()[0]
    result = studio.upscale(image_id=parent.id, upscaler=TINY_ESRGAN, scale=2, owner="u:ann")
    item = result.images[0]
    assert item.image.size == (512, 512) and item.id != parent.id
    meta = item.metadata
    assert (meta["mode"], meta["parent_image_id"], meta["upscale_scale"], meta["upscale_upscaler"]) == \
        ("upscale", parent.id, 2.0, TINY_ESRGAN)
    assert meta["prompt"] == "a red fox" and meta["source_size"] == [256, 256]
    params = a1111_parse(_infotext(item.path))
    assert (params["Postprocess upscale by"], params["Postprocess upscaler"]) == ("2.0", TINY_ESRGAN)
    listed = studio.list_images(owner="u:ann", mode="upscale").items
    assert [i.id for i in listed] == [item.id]
    with pytest.raises(GalleryError):  # another owner's id is no image
        studio.upscale(image_id=parent.id, scale=2, owner="u:bob")
    with pytest.raises(ValidationError) as e:  # a refine pass runs at the new size: 2048 px a side at most
        studio.upscale(image=str(item.path), scale=8, refine_denoise=0.4)
    assert e.value.field == "scale" and "largest factor allowed for 512×512 is 4×" in str(e.value)
    assert "2048 px a side" in str(e.value)

    refined = studio.upscale(image=str(parent.path), scale=1.5, refine_prompt="a red fox, detailed",
                             refine_denoise=0.5, refine_steps=2)
    r = refined.images[0]
    assert r.image.size == (384, 384)
    assert (r.metadata["mode"], r.metadata["prompt"], r.metadata["strength"]) == ("img2img", "a red fox, detailed", 0.5)
    assert r.metadata["parent_image_id"] is None and r.metadata["upscale_upscaler"] == "Lanczos"
    assert r.saved is not None and r.metadata["init_image_sha256"], "the upscaled image is its stored init"


# --- the API and the CLI --------------------------------------------------------------------------


def test_api_upscale_list_upscalers_and_hires_on_txt2img(tmp_path_factory, tiny_family, spandrel):
    gradio_client = pytest.importorskip("gradio_client")
    from gradio_client import handle_file

    from tests.conftest_ui import api_client, running_studio

    with running_studio(tmp_path_factory.mktemp("api17") / "data", tiny_family) as (url, _studio):
        client = api_client(url, tmp_path_factory.mktemp("dl17"))
        images, seed, info = client.predict(prompt="a red fox", hires_scale=1.5, hires_steps=3,
                                            hires_upscaler="latent-nearest-exact", **FAST, api_name="/txt2img")
        with Image.open(images[0]) as im:
            assert im.size == (384, 384)
            assert json.loads(im.text["sd35studio"])["hires_upscaler"] == "latent-nearest-exact"
        listing = client.predict(api_name="/list_upscalers")
        assert [u["name"] for u in listing["upscalers"]] == [TINY_ESRGAN] and listing["builtin"] == ["Lanczos"]
        png, details, info = client.predict(image=handle_file(images[0]), upscaler=TINY_ESRGAN, scale=2,
                                            api_name="/upscale")
        with Image.open(png) as im:
            assert im.size == (768, 768)
        assert (details["width"], details["upscaler"], details["mode"]) == (768, TINY_ESRGAN, "upscale")
        assert "Upscaled 384×384 by 2.0" in info


def test_cli_hires_flags_and_the_upscale_command(demo_config, capsys, spandrel):
    from studio.app.cli import main
    from studio.gallery import Gallery

    data = str(demo_config.data_dir)
    code = main(["generate", "a red fox", "--demo", "--data-dir", data, "--steps", "2", "--seed", "3", "--slg", "off",
                 "--hires-scale", "1.5", "--hires-steps", "2", "--hires-denoise", "0.5", "--hires-upscaler", "Lanczos"])
    out = capsys.readouterr()
    assert code == 0, out.err
    first = out.out.split()[0]
    with Image.open(first) as im:
        assert im.size == (384, 384)
    code = main(["upscale", first, "--scale", "2", "--upscaler", TINY_ESRGAN, "--demo", "--data-dir", data])
    out = capsys.readouterr()
    assert code == 0, out.err
    path = out.out.strip()
    with Image.open(path) as im:
        assert im.size == (768, 768)
    assert [str(i.path) for i in Gallery(demo_config.data_dir).list(mode="upscale").items] == [path]
    assert main(["upscale", first, "--scale", "9", "--demo", "--data-dir", data]) == 2
    assert "Upscale by is 9" in capsys.readouterr().err
