""""Reuse parameters", then Generate, gives the same pixels as the original — in every mode.

The tabs are built as the app builds them and driven without a browser: the original is made
from a tab's values through ``tab.request`` → ``studio.generate``; "reuse" is the app's
``reuse_updates`` (the gallery's metadata and the stored inputs, by id); the reused tab's values
go through ``request`` and ``generate`` again. The browser's half is in tests/test_browser_reuse.py.
"""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from studio.ui import tab_img2img, tab_inpaint, tab_turbo, tab_txt2img
from studio.ui.app import reuse_updates
from studio.ui.context import UIContext
from studio.ui.controls import CUSTOM


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_family):
    """One demo studio for the module (its models stay loaded between tests)."""
    from studio.config import StudioConfig
    from studio.service import Studio

    config = StudioConfig(data_dir=tmp_path_factory.mktemp("reuse") / "data", demo=True)
    config.tiny_dir.parent.mkdir(parents=True)
    config.tiny_dir.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)
    return Studio(config)


@pytest.fixture
def ui(studio):
    """(ctx, {mode: tab}) built in a Blocks, as build_app builds them."""
    with gr.Blocks():
        ctx = UIContext.create(studio)
        ctx.extra["header"] = gr.HTML()
        tabs = {"txt2img": tab_txt2img.create_ui(ctx), "img2img": tab_img2img.create_ui(ctx),
                "inpaint": tab_inpaint.create_ui(ctx), "turbo": tab_turbo.create_ui(ctx)}
    return ctx, tabs


def _components(tab) -> list:
    comps = list(tab.inputs()) + list(tab.extra_inputs()) + list(tab.reuse_targets())
    if tab.lora_group() is not None:
        comps += tab.lora_group().components()
    return list(dict.fromkeys(comps))


def values(tab, updates: dict | None = None, **by_field) -> dict:
    """The tab's values: each component's default, then ``updates`` (what a handler returned, as
    the browser would apply it), then fields set by name (``field_components``)."""
    updates = dict(updates or {})
    comps = tab.field_components()
    for name, value in by_field.items():
        updates[comps[name] if name in comps else getattr(tab, name)] = value
    out = {}
    for comp in _components(tab):
        value = updates.get(comp, getattr(comp, "value", None))
        if isinstance(value, dict) and value.get("__type__") == "update":
            value = value.get("value", getattr(comp, "value", None))
        out[comp] = value
    return out


def make(studio, tab, vals):
    res = studio.generate(tab.request(vals))
    res.wait_saved()
    return res


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def reuse_then_generate(studio, ctx, tabs, image, expect_tab):
    """Reuse a generated image's gallery entry; Generate in the tab it opens. (result, values, note)"""
    item = studio.get_image(image.id)
    out, note = reuse_updates(ctx, tabs, item.metadata, studio.image_inputs(item.id))
    assert note.tab == expect_tab
    tab = tabs[note.tab]
    vals = values(tab, out)
    return make(studio, tab, vals), vals, note


def test_txt2img_reuse_gives_the_same_pixels(studio, ui):
    ctx, tabs = ui
    t = tabs["txt2img"]
    original = make(studio, t, values(t, prompt="a red fox", steps=2, seed=11, guidance=5.0, shift=2.5))
    # the user changes everything before reusing
    again, vals, note = reuse_then_generate(studio, ctx, tabs, original.images[0], "txt2img")
    assert vals[t.prompt_row.prompt] == "a red fox" and vals[t.seed_row.seed] == 11
    assert np.array_equal(pixels(again.images[0].image), pixels(original.images[0].image))
    assert again.images[0].metadata["shift"] == 2.5


def test_turbo_256_comes_back_as_256_and_the_same_pixels(studio, ui):
    ctx, tabs = ui
    t = tabs["turbo"]
    original = make(studio, t, values(t, {t.size.aspect: CUSTOM, t.size.width: 256, t.size.height: 256},
                                      prompt="a lighthouse", seed=3))
    assert (original.images[0].metadata["width"], original.images[0].metadata["height"]) == (256, 256)
    again, vals, _ = reuse_then_generate(studio, ctx, tabs, original.images[0], "turbo")
    assert vals[t.size.aspect] == CUSTOM and (vals[t.size.width], vals[t.size.height]) == (256, 256)
    assert t.size.size(vals[t.size.aspect], vals[t.size.width], vals[t.size.height]) == (256, 256)
    assert np.array_equal(pixels(again.images[0].image), pixels(original.images[0].image))


def test_img2img_512_comes_back_with_its_size_and_init_image(studio, ui, tmp_path):
    ctx, tabs = ui
    t = tabs["img2img"]
    src = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(src)
    original = make(studio, t, values(t, {t.init_image: str(src)}, prompt="a barn in snow", steps=3, seed=5,
                                      strength=0.7))
    meta = original.images[0].metadata
    assert (meta["width"], meta["height"]) == (512, 512) and meta["init_image_sha256"]
    again, vals, note = reuse_then_generate(studio, ctx, tabs, original.images[0], "img2img")
    assert vals[t.init_image] and pixels(Image.open(vals[t.init_image])).tolist() == pixels(Image.open(src)).tolist()
    assert (vals[t.size.width], vals[t.size.height]) == (512, 512) and vals[t.strength] == 0.7
    assert "not stored" not in note.text
    assert np.array_equal(pixels(again.images[0].image), pixels(original.images[0].image))


def test_inpaint_reuse_puts_the_source_and_mask_back(studio, ui, tmp_path):
    ctx, tabs = ui
    t = tabs["inpaint"]
    src, mask = tmp_path / "src.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(src)
    m = Image.new("L", (256, 256), 0)
    m.paste(255, (64, 64, 192, 160))
    m.save(mask)
    original = make(studio, t, values(t, {t.editor: {"background": str(src), "layers": [], "composite": None},
                                          t.mask_upload: str(mask)}, prompt="a red scarf", steps=3, seed=9))
    again, vals, _ = reuse_then_generate(studio, ctx, tabs, original.images[0], "inpaint")
    editor = vals[t.editor]
    # the editor shows the source (not the result), with the mask painted over it
    assert np.array_equal(pixels(editor["background"]), pixels(Image.open(src)))
    assert not np.array_equal(pixels(editor["background"]), pixels(original.images[0].image))
    painted = np.asarray(editor["layers"][0].getchannel("A"))
    assert np.array_equal(painted, np.asarray(m))
    assert vals[t.mask_upload] and np.array_equal(np.asarray(Image.open(vals[t.mask_upload]).convert("L")),
                                                  np.asarray(m))
    assert np.array_equal(pixels(again.images[0].image), pixels(original.images[0].image))


def test_reuse_switches_to_the_variant_it_was_made_with_and_says_so(studio, ui):
    ctx, tabs = ui
    t = tabs["txt2img"]
    ctx.main_variant = "sd3-medium"
    original = make(studio, t, values(t, prompt="a cat", steps=2, seed=21))
    assert original.images[0].metadata["variant"] == "sd3-medium"
    ctx.main_variant = "sd3.5-medium"  # the user moved on to another model
    again, vals, note = reuse_then_generate(studio, ctx, tabs, original.images[0], "txt2img")
    assert note.switched == "sd3-medium" and "SD3 Medium" in note.text and "instead of SD3.5 Medium" in note.text
    assert again.images[0].metadata["variant"] == "sd3-medium"
    assert np.array_equal(pixels(again.images[0].image), pixels(original.images[0].image))


def test_reuse_of_a_batch_image_sets_up_its_run(studio, ui):
    """An image of a batch is not bit for bit the image made alone: reuse asks for its run."""
    ctx, tabs = ui
    t = tabs["txt2img"]
    original = make(studio, t, values(t, prompt="two foxes", steps=2, seed=40, batch_size=2, batch_count=2))
    fourth = original.images[3]
    assert fourth.metadata["seed"] == 43
    again, vals, note = reuse_then_generate(studio, ctx, tabs, fourth, "txt2img")
    assert (vals[t.seed_row.seed], vals[t.batch.batch_size], vals[t.batch.batch_count]) == (42, 2, 1)
    assert "image 2 of 2" in note.text
    assert len(again.images) == 2
    assert np.array_equal(pixels(again.images[1].image), pixels(fourth.image))


def test_a_foreign_png_reuses_its_own_seed_alone(ui):
    ctx, tabs = ui
    out, note = reuse_updates(ctx, tabs, {"prompt": "x", "seed": 7, "batch_size": 4, "steps": 20})
    t = tabs["txt2img"]
    assert (out[t.seed_row.seed], out[t.batch.batch_size], out[t.batch.batch_count]) == (7, 1, 1)
