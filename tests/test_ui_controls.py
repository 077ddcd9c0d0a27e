"""The controls that expose #15/#16/#17 in the page: sampler and schedule, styles, the T5 prompt
and prompt weighting, the live token counter, hires fix, the Control tab (its preview and a
ControlNet generation) and the gallery's Upscale — each driven as the browser drives it (the
tab's values → ``tab.request`` → ``studio.generate``; handlers called with the values the page
sends), and each one's reuse bringing the setting back. Tiny demo models, 256², 2 steps."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageDraw

from studio.ui import tab_control, tab_gallery, tab_img2img, tab_inpaint, tab_turbo, tab_txt2img
from studio.ui.app import reuse_updates
from studio.ui.context import UIContext
from studio.ui.controls import AUTOMATIC, CUSTOM
from tests.test_ui_reuse import values


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_family):
    from studio.config import StudioConfig
    from studio.service import Studio

    config = StudioConfig(data_dir=tmp_path_factory.mktemp("uic") / "data", demo=True)
    config.tiny_dir.parent.mkdir(parents=True)
    config.tiny_dir.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    (config.data_dir / "styles.csv").write_text('name,prompt,negative_prompt\nNeon,"{prompt}, neon glow",blurry\n')
    return Studio(config)


@pytest.fixture(scope="module")
def ui(studio):
    with gr.Blocks() as demo:
        ctx = UIContext.create(studio)
        ctx.extra["header"] = gr.HTML()
        tabs = {"txt2img": tab_txt2img.create_ui(ctx), "img2img": tab_img2img.create_ui(ctx),
                "inpaint": tab_inpaint.create_ui(ctx), "turbo": tab_turbo.create_ui(ctx),
                "control": tab_control.create_ui(ctx)}
        gallery = tab_gallery.create_ui(ctx)
        for t in tabs.values():
            t.wire()
    ctx.extra["demo"] = demo
    return ctx, tabs, gallery


def handler(demo, trigger, output):
    """The function the page runs when ``trigger`` fires and updates ``output``."""
    for f in demo.fns.values():
        if output in f.outputs and trigger._id in [t[0] for t in f.targets]:
            return f.fn
    raise AssertionError("no such event")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    img = Image.new("RGB", (256, 256), (40, 60, 80))
    d = ImageDraw.Draw(img)
    d.ellipse((50, 50, 150, 150), fill=(250, 240, 230))
    d.rectangle((170, 30, 200, 230), fill=(10, 20, 30))
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    img.save(path)
    return str(path)


SMALL = dict(steps=2)


def make(studio, tab, vals):
    res = studio.generate(tab.request(vals))
    res.wait_saved()
    return res


def fast(tab, **kw):
    """The tab's values at 256² Custom, 2 steps."""
    return values(tab, {tab.size.aspect: CUSTOM, tab.size.width: 256, tab.size.height: 256}, **SMALL, **kw)


def reuse(studio, ctx, tabs, image, source="studio"):
    item = studio.get_image(image.id)
    return reuse_updates(ctx, tabs, item.metadata, studio.image_inputs(item.id), source)


def test_sampler_schedule_styles_t5_prompt_and_weighting_reach_the_image_and_come_back(studio, ui):
    ctx, tabs, _ = ui
    t = tabs["txt2img"]
    assert "Neon" in t.prompt_row.styles.choices[0] or ("Neon", "Neon") in t.prompt_row.styles.choices
    base = make(studio, t, fast(t, prompt="a red fox", seed=5))
    vals = fast(t, prompt="a red fox", seed=5)
    vals.update({t.sampling.sampler: "DPM++ 2M", t.sampling.schedule: "Karras", t.prompt_row.styles: ["Neon"],
                 t.advanced.prompt_3: "a fox in snow", t.advanced.prompt_weighting: False,
                 t.advanced.speed: "fast"})
    res = make(studio, t, vals)
    meta = res.images[0].metadata
    assert (meta["sampler"], meta["schedule"], meta["styles"]) == ("DPM++ 2M", "Karras", ["Neon"])
    assert (meta["prompt_3"], meta["prompt_weighting"], meta["speed"]) == ("a fox in snow", False, "fast")
    assert base.images[0].metadata["speed"] == "off"  # the default: exact reproduction
    assert not np.array_equal(np.asarray(res.images[0].image), np.asarray(base.images[0].image))
    # Automatic schedule: the engine's own choice (no schedule sent)
    assert t.request({**vals, t.sampling.schedule: AUTOMATIC}).schedule is None

    out, note = reuse(studio, ctx, tabs, res.images[0])
    assert note.tab == "txt2img"
    again = values(t, out)
    assert (again[t.sampling.sampler], again[t.sampling.schedule]) == ("DPM++ 2M", "Karras")
    assert again[t.prompt_row.styles] == ["Neon"] and again[t.prompt_row.prompt] == "a red fox"
    assert (again[t.advanced.prompt_3], again[t.advanced.prompt_weighting]) == ("a fox in snow", False)
    assert again[t.advanced.speed] == "fast"
    redo = make(studio, t, again)
    assert np.array_equal(np.asarray(redo.images[0].image), np.asarray(res.images[0].image))


def test_an_a1111_png_maps_its_sampler_names_and_says_what_did_not_map(studio, ui, tmp_path):
    from studio.metadata import read_png_info

    ctx, tabs, _ = ui
    t = tabs["txt2img"]
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a castle\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 4, "
                                "Size: 256x256, Hires upscaler: Latent (antialiased)")
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    read = read_png_info(str(path))
    assert read.source == "a1111"
    out, note = reuse_updates(ctx, tabs, read.fields, None, read.source)
    vals = values(t, out)
    assert (vals[t.sampling.sampler], vals[t.sampling.schedule]) == ("DPM++ 2M", "Karras")
    assert vals[t.seed_row.seed] == 4 and vals[t.sampling.steps] == 3


def test_the_token_counter_says_what_the_encoders_read_before_generate(studio, ui):
    ctx, tabs, _ = ui
    t = tabs["txt2img"]
    count = handler(ctx.extra["demo"], t.prompt_row.prompt, t.prompt_row.tokens)
    studio.unload_model()
    assert count("a red fox", 256, "", True) == ""  # no tokenizers before a model is loaded
    studio.load_model()
    text = count("a red fox", 256, "", True)
    assert text.startswith("Tokens: CLIP ") and "T5" in text
    long = "a red fox in the snow, " * 30
    assert "cut" in count(long, 64, "", True)  # T5 reads 64 tokens: the rest is shown as cut
    assert "chunks" in count(long, 256, "", True)  # CLIP reads it in 75-token chunks
    assert "cut" in count(long, 256, "", False)  # literal text: one CLIP window of 77
    assert count("a red fox", 99999, "", True) == ""  # an out-of-range slider: Generate says so


def test_hires_fix_from_the_tab_doubles_the_size_and_reuse_turns_it_back_on(studio, ui):
    ctx, tabs, _ = ui
    t = tabs["txt2img"]
    h = t.hires
    off = t.request(fast(t, prompt="a lighthouse", seed=2))
    assert off.hires_scale is None  # off unless enabled
    vals = fast(t, prompt="a lighthouse", seed=2)
    vals.update({h.enabled: True, h.scale: 2.0, h.steps: 3, h.denoise: 0.4, h.upscaler: "Lanczos"})
    res = make(studio, t, vals)
    assert res.images[0].image.size == (512, 512)
    meta = res.images[0].metadata
    assert meta["hires_scale"] == 2.0 and meta["hires_denoise"] == 0.4
    out, _ = reuse(studio, ctx, tabs, res.images[0])
    again = values(t, out)
    assert again[h.enabled] is True and again[h.scale] == 2.0 and again[h.denoise] == 0.4
    assert t.request(again).hires_scale == 2.0


def test_control_tab_preview_generate_and_reuse(studio, ui, photo):
    ctx, tabs, _ = ui
    c = tabs["control"]
    assert c.control_type.value == "canny" and "inpaint" not in [x[1] for x in c.control_type.choices]
    vals = fast(c, prompt="a red fox", seed=3)
    vals.update({c.control_image: photo, c.control_type: "canny", c.canny_low: 50, c.canny_high: 150,
                 c.control_scale: 0.8})
    req = c.request(vals)
    assert (req.control_type, req.control_scale, req.canny_low, req.controlnet) == ("canny", 0.8, 50, None)
    res = make(studio, c, vals)
    units = res.images[0].metadata["controlnets"]
    assert units[0]["type"] == "canny" and units[0]["scale"] == 0.8
    # the map the ControlNet read: edges of the photo, at the generation's size
    edges = studio.control_preview(photo, "canny", None, None, 50, 150, None, None, None, 256, 256)
    arr = np.asarray(edges.convert("L"))
    assert edges.size == (256, 256) and 0 < (arr > 127).mean() < 0.2

    out, note = reuse(studio, ctx, tabs, res.images[0])
    assert note.tab == "control"  # an image made with a ControlNet opens the Control tab
    again = values(c, out)
    assert again[c.control_image]  # the stored control image, found by the gallery id
    assert (again[c.control_type], again[c.control_scale], again[c.canny_low]) == ("canny", 0.8, 50)
    redo = make(studio, c, again)
    assert np.array_equal(np.asarray(redo.images[0].image), np.asarray(res.images[0].image))


def test_gallery_upscale_saves_a_new_image_that_names_its_parent(studio, ui):
    ctx, tabs, gallery = ui
    t = tabs["txt2img"]
    parent = make(studio, t, fast(t, prompt="a small house", seed=8)).images[0]
    out = gallery._upscale(parent.id, "Lanczos", 2.0, False, 0.3, None, None)
    new_id = out[gallery.selected_id]
    assert new_id and new_id != parent.id
    item = studio.get_image(new_id)
    assert item.metadata["parent_image_id"] == parent.id and item.metadata["mode"] == "upscale"
    with Image.open(item.path) as im:
        assert im.size == (512, 512)
    with pytest.raises(gr.Error, match="Upscale by"):
        gallery._upscale(parent.id, "Lanczos", 99, False, 0.3, None, None)
    with pytest.raises(gr.Error, match="no image|not found|No image"):
        gallery._upscale("not-an-id", "Lanczos", 2.0, False, 0.3, None, None)
    with pytest.raises(gr.Error, match="Select an image in the gallery, or upload one"):
        gallery._upscale(None, "Lanczos", 2.0, False, 0.3, None, None)


def test_gallery_upscale_of_an_upload_and_a_bad_upload(studio, ui, photo, tmp_path):
    _, _, gallery = ui
    out = gallery._upscale(None, "Lanczos", 1.5, False, 0.3, photo, None)
    item = studio.get_image(out[gallery.selected_id])
    assert item.metadata["parent_image_id"] is None and item.metadata["source_size"] == [256, 256]
    with Image.open(item.path) as im:
        assert im.size == (384, 384)
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(gr.Error, match="image"):
        gallery._upscale(None, "Lanczos", 2.0, False, 0.3, str(bad), None)
