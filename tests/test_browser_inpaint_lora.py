"""Inpaint and LoRA in a real browser (pytest-playwright + the system Chromium), demo mode:
paint a mask over an uploaded image and generate; pick a LoRA in txt2img and generate; reuse an
inpaint result's parameters from the gallery (its mask comes back)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from tests.conftest_ui import BROWSER_TIMEOUT_MS, CHROMIUM, open_studio, running_studio, screenshot_dir, set_number

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser tests",
                allow_module_level=True)
pytest.importorskip("pytest_playwright")

from playwright.sync_api import Page, expect  # noqa: E402

from tests.test_inpaint import source  # noqa: E402

T = BROWSER_TIMEOUT_MS


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1440, "height": 1100}}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_family):
    from tests.test_lora import make_lora

    data = tmp_path_factory.mktemp("browser-inpaint") / "data"
    (data / "loras").mkdir(parents=True)
    make_lora(data / "loras" / "style-a.safetensors", tiny_family["sd3.5-medium"], seed=1)
    with running_studio(data, tiny_family) as (url, studio):
        yield url, studio


@pytest.fixture
def ui(page: Page, app):
    return open_studio(page, app[0])


def test_paint_a_mask_and_inpaint_then_reuse_it(ui: Page, app, tmp_path):
    _, studio = app
    src = tmp_path / "src.png"
    source().save(src)
    ui.get_by_role("tab", name="Inpaint", exact=True).click()
    editor = ui.locator("#inpaint-editor")
    expect(editor.locator("canvas").first).to_be_visible()
    for _attempt in range(3):  # the editor ignores a file set before its canvas has finished mounting
        ui.wait_for_timeout(1000)
        editor.locator("input[type=file]").set_input_files(str(src))
        try:
            expect(editor.get_by_text("Upload an image")).to_have_count(0, timeout=5_000)
            break
        except AssertionError:
            continue
    expect(editor.get_by_text("Upload an image")).to_have_count(0)  # the image is on the canvas
    canvas = editor.locator("canvas").first
    expect(canvas).to_be_visible()
    ui.wait_for_timeout(1000)
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    ui.mouse.move(cx - 30, cy - 30)
    ui.mouse.down()
    for step in range(13):
        ui.mouse.move(cx - 30 + step * 5, cy - 30 + step * 5, steps=2)
    ui.mouse.up()
    ui.locator("#inpaint-prompt textarea").fill("a red fox in the middle")
    set_number(ui, "inpaint-steps", 3)
    ui.locator("#inpaint-generate").click()
    info = ui.locator("#inpaint-info textarea")
    expect(info).to_have_value(re.compile(r"1 image\(s\), 256×256"), timeout=T)
    item = studio.gallery.list(mode="inpaint").items[0]
    meta = item.metadata
    assert meta["prompt"] == "a red fox in the middle" and meta["mask_sha256"]
    mask = studio.engine.masks.get(meta["mask_sha256"])
    x0, y0, x1, y1 = mask.getbbox()
    assert 0 < x0 < 128 < x1 < 256 and 0 < y0 < 128 < y1 < 256  # the stroke across the middle

    # gallery → reuse parameters: back in the Inpaint tab with the image and its mask
    ui.locator("#inpaint-prompt textarea").fill("something else")
    ui.get_by_role("tab", name="Gallery", exact=True).click()
    q = ui.locator("#gallery-query input, #gallery-query textarea").first
    q.fill("middle")
    q.press("Enter")
    expect(ui.locator("#gallery-page")).to_contain_text("1 image")
    ui.locator("#gallery-grid .thumbnail-item").first.click()
    expect(ui.locator("#gallery-detail-info textarea")).to_have_value(re.compile("Mask blur: 4"))
    ui.locator("#gallery-reuse").click()
    expect(ui.locator("#inpaint-prompt textarea")).to_have_value("a red fox in the middle")
    # the mask is visible: painted in the editor over the source, and in the upload box (opened)
    expect(editor.get_by_text("Upload an image")).to_have_count(0)
    expect(ui.locator("#inpaint-mask-upload img")).to_be_visible()
    ui.wait_for_timeout(500)
    ui.screenshot(path=str(screenshot_dir() / "desktop-inpaint-reused.png"), full_page=True)
    ui.locator("#inpaint-generate").click()
    for _ in range(120):
        if studio.gallery.list(mode="inpaint").total == 2:
            break
        ui.wait_for_timeout(500)
    newest = studio.gallery.list(mode="inpaint").items[0]
    assert newest.id != item.id and newest.metadata["mask_sha256"] == meta["mask_sha256"]
    # from the source, not the result: the same pixels as the original
    assert newest.metadata["init_image_sha256"] == meta["init_image_sha256"]
    assert np.array_equal(np.asarray(Image.open(newest.path).convert("RGB")),
                          np.asarray(Image.open(item.path).convert("RGB")))


def test_pick_a_lora_in_txt2img(ui: Page, app):
    _, studio = app
    ui.locator("#txt2img-lora").get_by_text("LoRA", exact=True).first.click()
    ui.locator("#txt2img-lora-0 input").click()
    ui.get_by_role("option", name="style-a", exact=True).click()
    set_number(ui, "txt2img-lora-weight-0", 0.7)
    ui.locator("#txt2img-prompt textarea").fill("a fox with style")
    set_number(ui, "txt2img-steps", 2)
    ui.locator("#txt2img-generate").click()
    expect(ui.locator("#txt2img-info textarea")).to_have_value(re.compile(r"image\(s\)"), timeout=T)
    meta = studio.gallery.list(query="style").items[0].metadata
    assert [(d["name"], d["weight"]) for d in meta["loras"]] == [("style-a", 0.7)]
    # unload: the model is back to its base weights
    ui.locator("#txt2img-lora-unload").click()
    expect(ui.locator("#txt2img-lora-status")).to_contain_text("Unloaded 1 LoRA adapter")
    assert studio.models.active_loras() == []
