"""What a new user meets in the first hour (issue #20), in a real browser (pytest-playwright +
the system Chromium), demo mode: every tab's screens at 1400×1000 and on a phone (390×844),
saved as screenshots; results shown whole; a corrupt upload refused with the engine's message;
a clamped slider value said; reuse that reproduces; the Models & Memory hints.

Every generation is tiny (256², 1–2 steps). Screenshots go to the folder ``screenshot_dir()``
prints ($STUDIO_SCREENSHOTS, $OUT/screenshots or tests/screenshots)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from tests.conftest_ui import (BROWSER_TIMEOUT_MS, CHROMIUM, boxes, open_studio, open_tab, running_studio,
                               screenshot_dir, set_number)

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser tests",
                allow_module_level=True)
pytest.importorskip("pytest_playwright")

from playwright.sync_api import Page, expect  # noqa: E402

T = BROWSER_TIMEOUT_MS
expect.set_options(timeout=20_000)  # a tab's first render can take seconds on a busy 2-core machine
DESKTOP = {"width": 1400, "height": 1000}
PHONE = {"width": 390, "height": 844}
TABS = {"txt2img": "Text to image", "img2img": "Image to image", "inpaint": "Inpaint", "turbo": "Turbo",
        "control": "Control", "gallery": "Gallery", "models": "Models & Memory"}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": DESKTOP}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_family):
    with running_studio(tmp_path_factory.mktemp("first-hour") / "data", tiny_family) as (url, studio):
        yield url, studio


@pytest.fixture
def ui(page: Page, app):
    return open_studio(page, app[0])


def info(page: Page, prefix: str):
    return page.locator(f"#{prefix}-info textarea")


def generate(page: Page, prefix: str, prompt: str, steps: int | None = 1, expect_info=r"image\(s\)") -> None:
    page.locator(f"#{prefix}-prompt textarea").fill(prompt)
    if steps is not None:
        set_number(page, f"{prefix}-steps", steps)
    page.locator(f"#{prefix}-generate").click()
    expect(info(page, prefix)).to_have_value(re.compile(expect_info), timeout=T)


def shot(page: Page, name: str) -> None:
    path = screenshot_dir() / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def toast(page: Page, text):
    return page.locator(".toast-body").filter(has_text=text)


def assert_results_whole(page: Page, prefix: str, count: int) -> None:
    """Every result image lies inside the results box (nothing cropped off) and is drawn whole."""
    imgs = page.locator(f"#{prefix}-results .thumbnail-item img")
    expect(imgs).to_have_count(count)
    for frame in (boxes(page, f"#{prefix}-results .grid-wrap")[0], boxes(page, f"#{prefix}-results")[0]):
        for b in boxes(page, f"#{prefix}-results .thumbnail-item img"):
            assert b["height"] > 60, b
            assert frame["y"] - 1 <= b["y"] and b["y"] + b["height"] <= frame["y"] + frame["height"] + 1, (b, frame)
            assert frame["x"] - 1 <= b["x"] and b["x"] + b["width"] <= frame["x"] + frame["width"] + 1, (b, frame)
    fits = page.eval_on_selector_all(f"#{prefix}-results .thumbnail-item img",
                                     "els => els.map(e => getComputedStyle(e).objectFit)")
    assert set(fits) == {"contain"}, fits


def overlaps(a: dict, b: dict) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])


# --- the screens ---------------------------------------------------------------------------------


def test_every_tab_on_a_desktop(ui: Page, app, tmp_path):
    """1400×1000: results whole (a batch as a grid) in the generating tabs, presets that fit the
    model, the LoRA panel's hint (Turbo has one), the Models & Memory hints; a screenshot each."""
    _, studio = app
    ui.set_viewport_size(DESKTOP)
    # txt2img: a batch of 4 is a 2×2 grid of whole images
    set_number(ui, "txt2img-batch-size", 4)
    generate(ui, "txt2img", "four foxes on a hill")
    assert_results_whole(ui, "txt2img", 4)
    assert len({round(b["x"]) for b in boxes(ui, "#txt2img-results .thumbnail-item")}) == 2
    ui.locator("#txt2img-lora").get_by_text("LoRA", exact=True).first.click()
    expect(ui.locator("#txt2img-lora-status")).to_contain_text("No LoRAs yet")
    expect(ui.locator("#txt2img-lora-status")).to_contain_text("loras")
    shot(ui, "desktop-txt2img")

    # send to img2img carries the prompt and negative; one image fills the box, whole
    ui.locator("#txt2img-send-img2img").click()
    expect(ui.locator("#img2img-init img")).to_be_visible()
    expect(ui.locator("#img2img-prompt textarea")).to_have_value("four foxes on a hill")
    generate(ui, "img2img", "four foxes in the snow", steps=2)
    assert_results_whole(ui, "img2img", 1)
    shot(ui, "desktop-img2img")

    # the mask box's label stays clear of the mask it shows
    open_tab(ui, TABS["inpaint"])
    ui.locator("#inpaint-mask-upload-acc").get_by_text("Upload a mask instead").click()
    mask = tmp_path / "mask.png"
    drawn = Image.new("L", (256, 256), 0)
    drawn.paste(255, (64, 64, 192, 192))
    drawn.save(mask)
    ui.locator("#inpaint-mask-upload input[type=file]").set_input_files(str(mask))
    expect(ui.locator("#inpaint-mask-upload img")).to_be_visible()
    label = boxes(ui, "#inpaint-mask-upload [data-testid=block-label]")[0]
    shown = boxes(ui, "#inpaint-mask-upload img")[0]
    assert not overlaps(label, shown), (label, shown)
    shot(ui, "desktop-inpaint")

    # Turbo: its tiny demo accepts 1024 px at most, so its presets are scaled to fit, and it says so
    open_tab(ui, TABS["turbo"])
    ui.locator("#turbo-aspect input").click()
    expect(ui.get_by_role("option", name="16:9 (1024×592)")).to_be_visible()
    ui.keyboard.press("Escape")
    expect(ui.locator("#turbo-aspect")).to_contain_text("Presets scaled to fit 1024 px")
    ui.locator("#turbo-lora").get_by_text("LoRA", exact=True).first.click()
    expect(ui.locator("#turbo-lora-status")).to_contain_text("No LoRAs yet")
    generate(ui, "turbo", "a lighthouse at dusk", steps=1)  # at the native 256² (a preset is slow here)
    assert_results_whole(ui, "turbo", 1)
    shot(ui, "desktop-turbo")

    # Control: a control image, the map it makes (previewed before generating), then an image
    open_tab(ui, TABS["control"])
    photo = tmp_path / "photo.png"
    pic = Image.new("RGB", (256, 256), (40, 60, 80))
    pic.paste((250, 240, 230), (60, 60, 160, 160))
    pic.save(photo)
    ui.locator("#control-image input[type=file]").set_input_files(str(photo))
    expect(ui.locator("#control-image img")).to_be_visible()
    ui.locator("#control-preview-btn").click()
    expect(ui.locator("#control-map img")).to_be_visible(timeout=T)
    generate(ui, "control", "a white box", steps=1)
    assert_results_whole(ui, "control", 1)
    expect(ui.locator("#control-info textarea")).to_have_value(re.compile(r"image\(s\)"))
    shot(ui, "desktop-control")

    # hires fix: the accordion holds its controls; off until enabled
    open_tab(ui, TABS["txt2img"])
    ui.locator("#txt2img-hires").get_by_text("Hires fix", exact=True).first.click()
    expect(ui.locator("#txt2img-hires-on")).to_be_visible()
    expect(ui.locator("#txt2img-hires-upscaler")).to_be_visible()
    expect(ui.locator("#txt2img-sampler")).to_be_visible()
    ui.locator("#txt2img-prompt textarea").fill("a (red:1.2) fox " * 3)
    expect(ui.locator("#txt2img-tokens")).to_contain_text("CLIP", timeout=T)  # a model is loaded by now
    shot(ui, "desktop-txt2img-hires")

    open_tab(ui, TABS["gallery"])
    ui.locator("#gallery-grid .thumbnail-item").first.click()
    expect(ui.locator("#gallery-detail-info textarea")).to_have_value(re.compile("white box"))
    ui.locator("#gallery-upscale").get_by_text("Upscale", exact=True).first.click()
    expect(ui.locator("#gallery-upscale-btn")).to_be_visible()
    shot(ui, "desktop-gallery")
    ui.locator("#gallery-upscale-btn").click()
    expect(toast(ui, "Upscaled to 512×512").first).to_be_visible(timeout=T)
    shot(ui, "desktop-gallery-upscaled")
    # a search that finds nothing clears the Selected panel
    q = ui.locator("#gallery-query input, #gallery-query textarea").first
    q.fill("no such words anywhere")
    q.press("Enter")
    expect(ui.locator("#gallery-page")).to_contain_text("No images match")
    expect(ui.locator("#gallery-detail-info textarea")).to_have_value("")
    expect(ui.locator("#gallery-detail-image img")).to_have_count(0)
    expect(ui.locator("#gallery-reuse")).to_be_disabled()
    mode_options = ui.locator("#gallery-mode input")
    mode_options.click()
    expect(ui.get_by_role("option", name="inpaint", exact=True)).to_be_visible()
    ui.keyboard.press("Escape")

    open_tab(ui, TABS["models"])
    expect(ui.locator("#models-plan")).to_contain_text("Demo: the tiny models load as cpu-fp32", timeout=T)
    ui.locator("#models-variant input").click()
    ui.get_by_role("option", name="SD3.5 Large", exact=True).click()
    expect(ui.locator("#models-source textarea, #models-source input").first).to_have_attribute(
        "placeholder", re.compile("stabilityai/stable-diffusion-3.5-large ·"))
    shot(ui, "desktop-models")


def test_every_tab_on_a_phone(ui: Page, app):
    """390×844: controls stacked, Generate on the first screen and above the result; the tabs
    that do not fit are in Gradio's "More tabs" menu; a screenshot each."""
    ui.set_viewport_size(PHONE)
    ui.reload()
    expect(ui.locator("#txt2img-generate")).to_be_visible()
    for prefix, name in TABS.items():
        open_tab(ui, name)
        if prefix in ("txt2img", "img2img", "inpaint", "turbo", "control"):
            gen = boxes(ui, f"#{prefix}-generate")[0]
            results = boxes(ui, f"#{prefix}-results")[0]
            steps = boxes(ui, f"#{prefix}-steps")[0]
            assert gen["y"] + gen["height"] <= PHONE["height"] + 200, gen  # reached without scrolling past anything
            assert gen["y"] + gen["height"] <= results["y"], (gen, results)
            assert steps["y"] + steps["height"] <= results["y"], (steps, results)  # stacked, not side by side
            assert steps["width"] <= PHONE["width"] and results["width"] <= PHONE["width"]
        if prefix == "txt2img":
            generate(ui, "txt2img", "a fox on a phone")
            assert_results_whole(ui, "txt2img", 1)
        if prefix == "gallery":  # thumbnails load lazily: wait for them before the screenshot
            expect(ui.locator("#gallery-grid img").first).to_be_visible()
            ui.wait_for_function("() => [...document.querySelectorAll('#gallery-grid img')]"
                                 ".every(i => i.complete && i.naturalWidth > 0)")
            cols = {round(b["x"]) for b in boxes(ui, "#gallery-grid .thumbnail-item")}
            assert len(cols) == 2, cols  # two thumbnails a row on a phone
        if prefix == "models":
            expect(ui.locator("#models-hardware")).to_contain_text("RAM")
            expect(ui.locator("#models-plan")).to_contain_text("Demo: the tiny models load as")
        shot(ui, f"phone-{prefix}")
    width = ui.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"the page scrolls sideways on a phone ({width} px)"


# --- what the user is told ------------------------------------------------------------------------


def test_a_corrupt_upload_is_refused_on_arrival_and_on_generate(ui: Page, tmp_path, capfd):
    """A text file renamed .png, in every image input: the engine's message at once, again on
    Generate (toast and Info), and no traceback in the server's log."""
    bad = tmp_path / "broken.png"
    bad.write_text("this is not an image\n" * 20)
    message = re.compile(r"broken\.png\) is not an image the studio can read")

    open_tab(ui, TABS["img2img"])
    ui.locator("#img2img-init input[type=file]").set_input_files(str(bad))
    expect(toast(ui, message).first).to_be_visible(timeout=T)
    ui.locator(".toast-close").first.click()
    ui.locator("#img2img-prompt textarea").fill("from a broken file")
    ui.locator("#img2img-generate").click()
    expect(toast(ui, message).first).to_be_visible(timeout=T)
    expect(info(ui, "img2img")).to_have_value(re.compile(r"Not generated: The init image \(broken\.png\)"))

    open_tab(ui, TABS["inpaint"])
    ui.locator("#inpaint-mask-upload-acc").get_by_text("Upload a mask instead").click()
    ui.locator("#inpaint-mask-upload input[type=file]").set_input_files(str(bad))
    expect(toast(ui, re.compile(r"The mask \(broken\.png\) is not an image")).first).to_be_visible(timeout=T)
    editor = ui.locator("#inpaint-editor")
    expect(editor.locator("canvas").first).to_be_visible()
    ui.wait_for_timeout(1000)  # the editor ignores a file set before its canvas has mounted
    editor.locator("input[type=file]").set_input_files(str(bad))
    expect(toast(ui, re.compile(r"The init image \(broken\.png\) is not an image")).first).to_be_visible(timeout=T)
    ui.wait_for_timeout(500)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "ComponentProcessingError" not in out + err, (out + err)[-3000:]


def test_a_clamped_slider_value_is_said(ui: Page):
    """Steps 0 typed into the box: the slider sets 1, and a warning says so (in the corner,
    clear of the header and the Generate button)."""
    set_number(ui, "txt2img-steps", 0)
    note = toast(ui, "Steps 0 is below 1: it was set to 1.")
    expect(note.first).to_be_visible()
    expect(ui.locator("#txt2img-steps input[type=number]")).to_have_value("1")
    wrap = boxes(ui, ".toast-wrap .toast-body")[0]
    for other in ("#sd-header", "#txt2img-generate"):
        assert not overlaps(wrap, boxes(ui, other)[0]), other
    set_number(ui, "txt2img-guidance", 99)
    expect(toast(ui, "Guidance (CFG) 99 is above 30: it was set to 30.").first).to_be_visible()


def test_reuse_then_generate_gives_the_same_image(ui: Page, app):
    """The second image of a 256×256 Turbo batch of two: reuse brings back Custom 256×256 and its
    run (the run's first seed, batch size 2, one run); Generate makes that image's pixels again."""
    _, studio = app
    open_tab(ui, TABS["turbo"])
    ui.locator("#turbo-aspect input").click()
    ui.get_by_role("option", name="Custom", exact=True).click()
    set_number(ui, "turbo-width", 256)
    set_number(ui, "turbo-height", 256)
    set_number(ui, "turbo-batch-size", 2)
    generate(ui, "turbo", "a reused red lighthouse", steps=1)
    listed = studio.gallery.list(query="reused").items
    index, original = next((k, i) for k, i in enumerate(listed) if i.metadata["image_index"] == 1)
    assert (original.metadata["width"], original.metadata["height"]) == (256, 256)
    # the user changes the size, the batch and the prompt, then reuses the image from the gallery
    ui.locator("#turbo-aspect input").click()
    ui.get_by_role("option", name=re.compile(r"^1:1")).click()
    set_number(ui, "turbo-batch-size", 1)
    ui.locator("#turbo-prompt textarea").fill("something else")
    open_tab(ui, TABS["gallery"])
    q = ui.locator("#gallery-query input, #gallery-query textarea").first
    q.fill("reused")
    q.press("Enter")
    expect(ui.locator("#gallery-page")).to_contain_text("2 images")
    ui.locator("#gallery-grid .thumbnail-item").nth(index).click()
    expect(ui.locator("#gallery-detail-info textarea")).to_have_value(
        re.compile(f"Seed: {original.metadata['seed']}"))
    ui.locator("#gallery-reuse").click()
    expect(ui.locator("#turbo-prompt textarea")).to_have_value("a reused red lighthouse")
    expect(ui.locator("#turbo-aspect input")).to_have_value("Custom")
    expect(ui.locator("#turbo-width input")).to_have_value("256")
    expect(ui.locator("#turbo-height input")).to_have_value("256")
    expect(ui.locator("#turbo-seed input")).to_have_value(str(original.metadata["seed"] - 1))
    expect(ui.locator("#turbo-batch-size input[type=number]")).to_have_value("2")
    expect(toast(ui, "image 2 of 2").first).to_be_visible()
    ui.locator("#turbo-generate").click()
    for _ in range(240):
        if studio.gallery.list(query="reused").total == 4:
            break
        ui.wait_for_timeout(250)
    again = [i for i in studio.gallery.list(query="reused").items
             if i.id not in {x.id for x in listed} and i.metadata["image_index"] == 1]
    assert len(again) == 1 and again[0].metadata["seed"] == original.metadata["seed"]
    assert np.array_equal(np.asarray(Image.open(again[0].path).convert("RGB")),
                          np.asarray(Image.open(original.path).convert("RGB")))
