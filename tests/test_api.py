"""The named API endpoints, through gradio_client against the app launched in-process (demo mode).

Sizes stay at the tiny models' native 256² and steps at 2–4, so each generation is well under a
second or two on a CPU."""

from __future__ import annotations

import json

import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

from tests.conftest_ui import api_client, running_studio  # noqa: E402

FAST = dict(steps=2, width=256, height=256)


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_family):
    with running_studio(tmp_path_factory.mktemp("api") / "data", tiny_family) as (url, studio):
        client = api_client(url, tmp_path_factory.mktemp("downloads"))
        yield client, studio


def _txt2img(client, **kw):
    args = dict(prompt="a red fox", **FAST, seed=7)
    args.update(kw)
    return client.predict(**args, api_name="/txt2img")


def _png_text(path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


def test_endpoints_are_named(app):
    client, _ = app
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    for name in ("/txt2img", "/img2img", "/turbo", "/load_model", "/gallery_list", "/gallery_get",
                 "/gallery_star", "/gallery_delete", "/read_png_info"):
        assert name in names
    # the UI's streaming handlers are private: only the simple endpoints are public
    assert not any(n.startswith("/stream") for n in names)


def test_txt2img_returns_pngs_with_metadata_seed_and_info(app):
    client, _ = app
    images, seed, info = _txt2img(client, batch_size=2)
    assert seed == 7
    assert len(images) == 2
    for path in images:
        assert str(path).endswith(".png")
        text = _png_text(path)
        assert "parameters" in text and "Seed: " in text["parameters"]
        meta = json.loads(text["sd35studio"])
        assert meta["prompt"] == "a red fox" and meta["mode"] == "txt2img"
    seeds = {json.loads(_png_text(p)["sd35studio"])["seed"] for p in images}
    assert seeds == {7, 8}
    assert "2 image(s), 256×256" in info and "seed 7" in info


def test_txt2img_defaults_and_notes(app):
    client, _ = app
    # width/height None: the model's native size; an off-grid width is snapped and said so
    images, seed, info = client.predict(prompt="snap", width=260, height=None, steps=2, api_name="/txt2img")
    assert len(images) == 1 and seed >= 0
    assert "snapped to 256" in info
    images, seed, info = client.predict(prompt="native", steps=2, api_name="/txt2img")
    assert "256×256" in info


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(width=0), "Width 0 is out of range"),
        (dict(steps=0), "Steps is 0"),
        (dict(guidance=99), "Guidance (CFG scale) is 99"),
        (dict(batch_size=50), "Batch size is 50"),
        (dict(max_sequence_length=9999), "Max sequence length"),
    ],
)
def test_txt2img_bad_inputs_are_clear_errors(app, kw, message):
    client, _ = app
    with pytest.raises(AppError) as e:
        _txt2img(client, **kw)
    assert message in str(e.value)


def test_img2img(app, tmp_path):
    client, _ = app
    src = tmp_path / "init.png"
    Image.new("RGB", (300, 200), (200, 40, 40)).save(src)
    images, seed, info = client.predict(
        init_image=gradio_client.handle_file(str(src)), prompt="repaint", strength=0.5, steps=4, seed=3,
        api_name="/img2img",
    )
    assert len(images) == 1 and seed == 3
    meta = json.loads(_png_text(images[0])["sd35studio"])
    assert meta["mode"] == "img2img" and meta["strength"] == 0.5 and meta["init_image_sha256"]


def test_img2img_errors(app, tmp_path):
    client, _ = app
    with pytest.raises(AppError, match="img2img needs an init image"):
        client.predict(init_image=None, prompt="x", steps=4, api_name="/img2img")
    src = tmp_path / "init.png"
    Image.new("RGB", (256, 256), (0, 90, 200)).save(src)
    with pytest.raises(AppError, match=r"less than one step"):
        client.predict(init_image=gradio_client.handle_file(str(src)), prompt="x", steps=2, strength=0.2,
                       api_name="/img2img")
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(AppError):
        client.predict(init_image=gradio_client.handle_file(str(bad)), prompt="x", steps=4, api_name="/img2img")


def test_turbo_uses_large_turbo_without_cfg(app):
    client, studio = app
    images, seed, info = client.predict(prompt="fast fox", seed=11, api_name="/turbo")
    assert len(images) == 1 and seed == 11
    meta = json.loads(_png_text(images[0])["sd35studio"])
    assert meta["variant"] == "sd3.5-large-turbo" and meta["steps"] == 4 and meta["guidance"] == 0.0
    # txt2img afterwards goes back to the main model, not Turbo
    images, _, _ = _txt2img(client)
    assert json.loads(_png_text(images[0])["sd35studio"])["variant"] != "sd3.5-large-turbo"


def test_load_model_switches_variant(app):
    client, studio = app
    status = client.predict(variant="sd3-medium", source="", preset="auto", api_name="/load_model")
    assert "SD3 Medium" in status
    assert studio.models.current.variant.name == "sd3-medium"
    images, _, _ = _txt2img(client)
    assert json.loads(_png_text(images[0])["sd35studio"])["variant"] == "sd3-medium"
    with pytest.raises(AppError, match="pickled checkpoint"):
        client.predict(variant="", source="/tmp/model.ckpt", preset="auto", api_name="/load_model")
    # the failed load left the previous model in place
    assert studio.models.current.variant.name == "sd3-medium"
    status = client.predict(variant="sd3.5-medium", source="", preset="auto", api_name="/load_model")
    assert "SD3.5 Medium" in status


def test_gallery_list_get_star_delete(app):
    client, _ = app
    images, _, _ = _txt2img(client, prompt="zebra crossing at dusk")
    listing = client.predict(query="zebra", api_name="/gallery_list")
    assert listing["total"] == 1
    item = listing["items"][0]
    assert item["prompt"] == "zebra crossing at dusk" and item["starred"] is False
    everything = client.predict(api_name="/gallery_list")
    assert everything["total"] >= 2
    created = [i["created_at"] for i in everything["items"]]
    assert created == sorted(created, reverse=True)  # newest first

    png, details, infotext = client.predict(image_id=item["id"], api_name="/gallery_get")
    assert str(png).endswith(".png")
    assert details["metadata"]["prompt"] == "zebra crossing at dusk"
    assert "zebra crossing at dusk" in infotext and "Seed: 7" in infotext
    assert "sd35studio" in _png_text(png)  # the original PNG, metadata intact

    assert client.predict(image_id=item["id"], starred=True, api_name="/gallery_star")["starred"] is True
    starred = client.predict(starred_only=True, api_name="/gallery_list")
    assert [i["id"] for i in starred["items"]] == [item["id"]]
    assert client.predict(image_id=item["id"], starred=False, api_name="/gallery_star")["starred"] is False

    txt_only = client.predict(mode="turbo", api_name="/gallery_list")
    assert all(i["mode"] == "turbo" for i in txt_only["items"])

    assert client.predict(image_id=item["id"], api_name="/gallery_delete")["deleted"] is True
    assert client.predict(query="zebra", api_name="/gallery_list")["total"] == 0
    with pytest.raises(AppError, match="No image with id"):
        client.predict(image_id=item["id"], api_name="/gallery_get")
    with pytest.raises(AppError, match="No image with id"):
        client.predict(image_id="../../etc/passwd", api_name="/gallery_delete")
    with pytest.raises(AppError, match="No image with id"):
        client.predict(image_id="0123456789abcdef", starred=True, api_name="/gallery_star")


def test_read_png_info(app, tmp_path):
    client, _ = app
    images, _, _ = _txt2img(client, prompt="owl <b>bold</b>", negative_prompt="blurry")
    fields, infotext, source, error = client.predict(file=gradio_client.handle_file(images[0]),
                                                     api_name="/read_png_info")
    assert source == "studio" and not error
    assert fields["prompt"] == "owl <b>bold</b>" and fields["negative_prompt"] == "blurry"
    assert fields["seed"] == 7 and "Negative prompt: blurry" in infotext

    a1111 = tmp_path / "a1111.png"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nNegative prompt: dog\nSteps: 30, Sampler: Euler, CFG scale: 5, "
                                "Seed: 42, Size: 832x1216, Model: sd3.5_large")
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=info)
    fields, infotext, source, error = client.predict(file=gradio_client.handle_file(str(a1111)),
                                                     api_name="/read_png_info")
    assert source == "a1111"
    assert fields["steps"] == 30 and fields["seed"] == 42 and fields["width"] == 832

    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    fields, infotext, source, error = client.predict(file=gradio_client.handle_file(str(plain)),
                                                     api_name="/read_png_info")
    assert source == "none" and not fields
    with pytest.raises(AppError, match="Drop a PNG"):
        client.predict(file=None, api_name="/read_png_info")


def test_shared_deployments_hide_the_token_field(tmp_path):
    """On a share link / Space the Hugging Face token field is not part of the page."""
    from studio.config import StudioConfig
    from studio.service import Studio
    from studio.ui.app import build_app

    for shared in (False, True):
        studio = Studio(StudioConfig(data_dir=tmp_path / f"d{shared}", demo=True))
        studio.shared = shared
        demo = build_app(studio)
        hf = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "models-hf"]
        assert len(hf) == 1 and hf[0].visible is (not shared)
