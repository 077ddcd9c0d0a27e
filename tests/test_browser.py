"""The studio in a real browser (pytest-playwright + the system Chromium), demo mode.

Generates in each tab, cancels a run, uses the gallery (reuse parameters, send to img2img) and
switches model and preset in Models & Memory. Steps stay small and sizes at the tiny models'
native 256², so the module runs in well under three minutes on a CPU."""

from __future__ import annotations

import os
import re

import pytest

from tests.conftest_ui import BROWSER_TIMEOUT_MS, CHROMIUM, open_studio, running_studio, set_number

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser tests",
                allow_module_level=True)
pytest.importorskip("pytest_playwright")

from playwright.sync_api import Page, expect  # noqa: E402


T = BROWSER_TIMEOUT_MS


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1440, "height": 1000}}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_family):
    with running_studio(tmp_path_factory.mktemp("browser") / "data", tiny_family) as (url, studio):
        yield url, studio


@pytest.fixture
def ui(page: Page, app):
    return open_studio(page, app[0])


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def info(page: Page, prefix: str):
    return page.locator(f"#{prefix}-info textarea")


def generate(page: Page, prefix: str, prompt: str, steps: int | None = 2) -> None:
    page.locator(f"#{prefix}-prompt textarea").fill(prompt)
    if steps is not None:
        set_number(page, f"{prefix}-steps", steps)
    page.locator(f"#{prefix}-generate").click()
    expect(info(page, prefix)).to_have_value(re.compile(r"image\(s\)"), timeout=T)


def test_txt2img_generates_and_hostile_prompt_stays_text(ui: Page, app):
    hostile = 'fox <img src=x onerror="document.title=\'pwned\'"> <b id="injected">b</b>'
    generate(ui, "txt2img", hostile)
    expect(info(ui, "txt2img")).to_have_value(re.compile(r"1 image\(s\), 256×256, 2 steps"))
    expect(ui.locator("#txt2img-results img").first).to_be_visible()
    expect(ui.locator("#txt2img-progress")).to_have_text("")
    # the seed used can be recalled
    ui.locator("#txt2img-seed-reuse").click()
    expect(ui.locator("#txt2img-seed input")).not_to_have_value("-1")
    # the prompt is shown as text everywhere (results, gallery captions), never as HTML
    open_tab(ui, "Gallery")
    expect(ui.locator("#gallery-grid img").first).to_be_visible()
    assert ui.locator("#injected").count() == 0
    assert ui.title() == "SD3.5 Studio"


def test_turbo_tab(ui: Page):
    open_tab(ui, "Turbo")
    generate(ui, "turbo", "a quick sketch of a lighthouse", steps=None)
    expect(info(ui, "turbo")).to_have_value(re.compile(r"4 steps, CFG 0\.0.*SD3\.5 Large Turbo"))
    expect(ui.locator("#turbo-results img").first).to_be_visible()


def test_send_result_to_img2img_and_generate(ui: Page):
    generate(ui, "txt2img", "a red barn")
    ui.locator("#txt2img-negative textarea").fill("blurry")  # after the run: the image's own is sent
    ui.locator("#txt2img-send-img2img").click()
    expect(ui.locator("#img2img-prompt textarea")).to_have_value("a red barn")  # as A1111 does
    expect(ui.locator("#img2img-negative textarea")).to_have_value("")
    expect(ui.locator("#img2img-init img")).to_be_visible()
    generate(ui, "img2img", "the same barn in snow", steps=4)
    expect(info(ui, "img2img")).to_have_value(re.compile(r"1 image\(s\), 256×256"))


def test_img2img_without_image_shows_the_engine_error(ui: Page):
    open_tab(ui, "Image to image")
    ui.locator("#img2img-prompt textarea").fill("nothing to start from")
    ui.locator("#img2img-generate").click()
    expect(ui.get_by_text("img2img needs an init image").first).to_be_visible()


def test_cancel_keeps_finished_images(ui: Page):
    ui.locator("#txt2img-prompt textarea").fill("a long run to cancel")
    set_number(ui, "txt2img-steps", 40)
    set_number(ui, "txt2img-batch-count", 6)
    ui.locator("#txt2img-generate").click()
    # wait for the first run to finish (its image shows), then cancel the rest
    expect(ui.locator("#txt2img-progress")).to_contain_text("Run 2/6", timeout=T)
    ui.locator("#txt2img-cancel").click()
    expect(info(ui, "txt2img")).to_have_value(re.compile(r"Cancelled: the finished images were kept"), timeout=T)
    value = info(ui, "txt2img").input_value()
    kept = int(re.match(r"(\d+) image", value).group(1))
    assert 1 <= kept < 6
    assert ui.locator("#txt2img-results img").count() == kept


def test_gallery_reuse_parameters_and_send_to_img2img(ui: Page):
    generate(ui, "txt2img", "gallery heron at dawn")
    ui.locator("#txt2img-prompt textarea").fill("something else")
    set_number(ui, "txt2img-steps", 5)
    open_tab(ui, "Gallery")
    ui.locator("#gallery-query input, #gallery-query textarea").first.fill("heron")
    ui.locator("#gallery-query input, #gallery-query textarea").first.press("Enter")
    expect(ui.locator("#gallery-page")).to_contain_text("1 image")
    ui.locator("#gallery-grid .thumbnail-item").first.click()
    expect(ui.locator("#gallery-detail-info textarea")).to_have_value(re.compile("gallery heron at dawn"))
    # star it and filter on stars
    ui.locator("#gallery-star").click()
    expect(ui.locator("#gallery-star")).to_have_text(re.compile("Starred"))
    # reuse parameters: back in txt2img with the prompt, steps and seed of the image
    ui.locator("#gallery-reuse").click()
    expect(ui.locator("#txt2img-prompt textarea")).to_have_value("gallery heron at dawn")
    expect(ui.locator("#txt2img-steps input[type=number]")).to_have_value("2")
    seed = ui.locator("#txt2img-seed input").input_value()
    assert seed not in ("", "-1")
    # send to img2img from the gallery, with the image's prompt
    open_tab(ui, "Gallery")
    ui.locator("#gallery-send-img2img").click()
    expect(ui.locator("#img2img-init img")).to_be_visible()
    expect(ui.locator("#img2img-prompt textarea")).to_have_value("gallery heron at dawn")


def test_gallery_delete_asks_first(ui: Page):
    generate(ui, "txt2img", "doomed kingfisher")
    open_tab(ui, "Gallery")
    q = ui.locator("#gallery-query input, #gallery-query textarea").first
    q.fill("kingfisher")
    q.press("Enter")
    expect(ui.locator("#gallery-page")).to_contain_text("1 image")
    ui.locator("#gallery-grid .thumbnail-item").first.click()
    ui.locator("#gallery-delete").click()
    expect(ui.locator("#gallery-confirm-delete")).to_be_visible()
    ui.locator("#gallery-confirm-delete").click()
    expect(ui.locator("#gallery-page")).to_contain_text("No images match")


def test_switch_model_and_preset(ui: Page, app):
    _, studio = app
    open_tab(ui, "Models & Memory")
    expect(ui.locator("#models-memory")).to_contain_text("RAM")
    ui.locator("#models-variant input").click()
    ui.get_by_role("option", name="SD3 Medium", exact=True).click()
    ui.locator("#models-preset input").click()
    ui.get_by_role("option", name=re.compile("cpu-fp32")).first.click()
    ui.locator("#models-load").click()
    expect(ui.locator("#models-status textarea")).to_have_value(re.compile(r"Loaded SD3 Medium .*cpu-fp32"), timeout=T)
    expect(ui.locator("#sd-header")).to_contain_text("SD3 Medium (tiny demo)")
    assert studio.models.current.variant.name == "sd3-medium"
    # txt2img follows: the variant's recommended steps, and it generates on SD3 Medium
    open_tab(ui, "Text to image")
    expect(ui.locator("#txt2img-steps input[type=number]")).to_have_value("28")
    generate(ui, "txt2img", "after the switch")
    expect(info(ui, "txt2img")).to_have_value(re.compile("SD3 Medium"))
    # the HF token field is there on a local run
    open_tab(ui, "Models & Memory")
    expect(ui.locator("#models-token")).to_be_visible()
