"""Inpainting on the tiny SD3 family (16-channel transformer: diffusers' latent-blending path)."""

from __future__ import annotations

import numpy as np
import pytest

from studio.errors import GalleryError
from PIL import Image

from studio.engine import Engine, GenerationRequest, ValidationError
from studio.blobs import BlobStore as MaskStore
from studio.engine.inpaint import mask_from_editor, normalize_mask, plan
from studio.models import ModelManager

FAST = dict(steps=3, seed=5, strength=1.0)


def source(size=(256, 256)) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def square_mask(size=(256, 256), box=(96, 96, 160, 160)) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


@pytest.fixture
def engine(demo_config, tmp_path):
    from studio.gallery import Gallery

    return Engine(ModelManager(demo_config), Gallery(tmp_path / "g"))


def inpaint(engine, **kw):
    args = dict(prompt="a red fox", mode="inpaint", init_image=source(), mask_image=square_mask(), **FAST)
    args.update(kw)
    return engine.generate(GenerationRequest(**args))


def diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean(-1)


def test_validation_messages(engine):
    with pytest.raises(ValidationError, match="(?i)the mask is empty: paint the area to change") as e:
        inpaint(engine, mask_image=Image.new("L", (256, 256), 0))
    assert e.value.field == "mask_image"
    with pytest.raises(ValidationError, match="needs a mask"):
        inpaint(engine, mask_image=None)
    with pytest.raises(ValidationError, match="Inpaint needs an image"):
        inpaint(engine, init_image=None)
    with pytest.raises(ValidationError, match="Mask blur"):
        inpaint(engine, mask_blur=-1)
    with pytest.raises(ValidationError, match="padding"):
        inpaint(engine, only_masked=True, padding=10_000)


def test_unmasked_pixels_stay_and_masked_pixels_change(engine):
    res = inpaint(engine, mask_blur=0)
    out = res.images[0].image
    assert out.size == (256, 256)
    d = diff(out, source())
    inside = square_mask().point(lambda v: v > 127)
    inside = np.asarray(inside, dtype=bool)
    assert d[~inside].mean() < 0.5  # outside the mask: the source (pasted back)
    assert d[inside].mean() > 10  # inside: repainted
    meta = res.images[0].metadata
    assert meta["mode"] == "inpaint" and meta["mask_blur"] == 0 and meta["only_masked"] is False
    assert meta["inpaint_box"] == [0, 0, 256, 256] and meta["work_size"] == [256, 256]
    assert len(meta["init_image_sha256"]) == 64 and meta["strength"] == 1.0


def test_mask_blur_feathers_the_edge(engine):
    sharp = diff(inpaint(engine, mask_blur=0).images[0].image, source())
    soft = diff(inpaint(engine, mask_blur=8).images[0].image, source())
    ring = np.zeros((256, 256), bool)
    ring[90:96, 96:160] = True  # just outside the top edge of the mask
    assert sharp[ring].max() == 0
    assert soft[ring].mean() > 0.5
    assert soft[:40, :40].max() == 0  # far away: untouched either way


def test_only_masked_crops_around_the_mask_and_pastes_back(engine):
    big = source((512, 384))
    mask = square_mask((512, 384), (300, 200, 340, 240))
    res = inpaint(engine, init_image=big, mask_image=mask, only_masked=True, padding=16, mask_blur=2)
    meta = res.images[0].metadata
    assert meta["inpaint_box"] == [284, 184, 356, 256]
    assert meta["work_size"] == [256, 256] and meta["padding"] == 16
    assert (meta["width"], meta["height"]) == (512, 384)
    out = res.images[0].image
    assert out.size == (512, 384)
    d = diff(out, big)
    outside = np.ones((384, 512), bool)
    outside[184 - 8:256 + 8, 284 - 8:356 + 8] = False
    assert d[outside].max() == 0  # outside the crop box nothing changes, at all
    assert d[205:235, 305:335].mean() > 10


def test_mask_is_stored_by_content_and_found_from_the_image_id(studio):
    res = inpaint(studio, batch_size=2)
    ids = [i.id for i in res.images]
    shas = {i.metadata["mask_sha256"] for i in res.images}
    assert len(shas) == 1  # one mask for the batch, stored once
    store = studio.blobs.masks
    files = list(store.folder.glob("*.png"))
    assert len(files) == 1
    for image_id in ids:
        path = studio.mask_path(image_id)
        assert path == str(files[0])
        with Image.open(path) as m:
            assert np.array_equal(np.asarray(m), np.asarray(square_mask()))
    with pytest.raises(GalleryError, match="No image with id"):
        studio.mask_path("0" * 16)
    assert store.path("../../etc/passwd") is None
    txt = studio.generate(GenerationRequest(prompt="x", steps=1, seed=1))
    assert "mask_sha256" not in txt.images[0].metadata
    with pytest.raises(GalleryError, match="has no inpaint mask"):
        studio.mask_path(txt.images[0].id)


def test_inpaint_metadata_reads_back_as_inpaint(engine):
    from studio.metadata import fields_from_infotext, read_png_info

    res = inpaint(engine, only_masked=True, padding=24, mask_blur=6)
    info = read_png_info(res.images[0].path)
    assert "Mask blur: 6, Inpaint area: Only masked, Masked area padding: 24" in info.infotext
    f = fields_from_infotext(info.infotext)
    assert (f["mode"], f["mask_blur"], f["only_masked"], f["padding"]) == ("inpaint", 6, True, 24)
    assert info.fields["mask_sha256"] == res.images[0].metadata["mask_sha256"]


def test_mask_inputs_editor_alpha_rgba_and_size_mismatch():
    bg = source()
    layer = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (10, 10, 30, 30))
    image, mask = mask_from_editor({"background": bg, "layers": [layer], "composite": bg})
    assert image is bg and mask.getbbox() == (10, 10, 30, 30)
    # an uploaded black/white RGB mask counts by luminance; a smaller one is resized, with a note
    up = square_mask((128, 128), (48, 48, 80, 80)).convert("RGB")
    m, notes = normalize_mask(up, (256, 256))
    assert m.size == (256, 256) and "resized" in notes[0]
    assert plan(m, True, 0, 256 * 256, 256, 2048).box[0] in range(94, 99)
    # an RGBA mask that is fully opaque counts by luminance, not alpha
    m2, _ = normalize_mask(square_mask().convert("RGBA"), (256, 256))
    assert m2.getbbox() == (96, 96, 160, 160)
    assert mask_from_editor(None) == (None, None)


def test_inpaint_with_a_lora(engine, lora_files):
    import shutil

    engine.models.config.loras_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(lora_files["style-a"], engine.models.config.loras_dir)
    base = inpaint(engine).images[0]
    styled = inpaint(engine, loras=[("style-a", 1.0)]).images[0]
    assert styled.metadata["loras"][0]["name"] == "style-a"
    assert diff(styled.image, base.image).mean() > 0.5
    assert np.array_equal(np.asarray(inpaint(engine).images[0].image), np.asarray(base.image))


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_family):
    from tests.test_lora import make_lora

    d = tmp_path_factory.mktemp("inpaint-lora")
    return {"style-a": make_lora(d / "style-a.safetensors", tiny_family["sd3.5-medium"], seed=1)}


def test_mask_store_roundtrip(tmp_path):
    store = MaskStore(tmp_path / "masks")
    sha = store.put(square_mask())
    assert store.put(square_mask()) == sha and len(list(store.folder.iterdir())) == 1
    assert np.array_equal(np.asarray(store.get(sha)), np.asarray(square_mask()))


# --- the API -------------------------------------------------------------------------------------


def test_api_inpaint_and_gallery_mask(tmp_path_factory, tiny_family, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    from gradio_client.exceptions import AppError

    from studio.metadata import read_png_info
    from tests.conftest_ui import api_client, running_studio

    src, mask = tmp_path / "src.png", tmp_path / "mask.png"
    source().save(src)
    square_mask().save(mask)
    empty = tmp_path / "empty.png"
    Image.new("L", (256, 256), 0).save(empty)
    with running_studio(tmp_path_factory.mktemp("inpaint-api") / "data", tiny_family) as (url, studio):
        client = api_client(url, tmp_path / "dl")
        h = gradio_client.handle_file
        assert "/inpaint" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        images, seed, info = client.predict(image=h(str(src)), mask=h(str(mask)), prompt="a red fox", strength=1.0,
                                            mask_blur=0, steps=3, seed=9, api_name="/inpaint")
        assert seed == 9 and len(images) == 1 and "256×256" in info
        d = diff(Image.open(images[0]).convert("RGB"), source())
        inside = np.asarray(square_mask(), dtype=bool)
        assert d[~inside].mean() < 0.5 and d[inside].mean() > 10
        meta = read_png_info(images[0]).fields
        assert meta["mode"] == "inpaint" and meta["mask_sha256"]
        image_id = client.predict(query="", api_name="/gallery_list")["items"][0]["id"]
        got = client.predict(image_id=image_id, api_name="/gallery_mask")
        assert np.array_equal(np.asarray(Image.open(got)), np.asarray(square_mask()))
        with pytest.raises(AppError, match="(?i)the mask is empty: paint the area to change"):
            client.predict(image=h(str(src)), mask=h(str(empty)), prompt="x", steps=2, api_name="/inpaint")
        with pytest.raises(AppError, match="needs a mask"):
            client.predict(image=h(str(src)), prompt="x", steps=2, api_name="/inpaint")
        txt, _, _ = client.predict(prompt="plain", steps=1, api_name="/txt2img")
        plain_id = client.predict(query="plain", api_name="/gallery_list")["items"][0]["id"]
        with pytest.raises(AppError, match="no inpaint mask"):
            client.predict(image_id=plain_id, api_name="/gallery_mask")
