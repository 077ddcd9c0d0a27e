"""The UI's side of the first hour (issue #20), without a browser: the handlers and the control
groups, driven directly. The same behaviours on screen are in tests/test_browser_first_hour.py."""

from __future__ import annotations

import types

import gradio as gr
import pytest

from studio.catalog import ASPECT_PRESETS, MAX_SIDE, TURBO_VARIANT, SizeRules
from studio.engine.limits import LIMITS
from studio.ui import tab_gallery, tab_img2img, tab_inpaint, tab_models, tab_turbo, tab_txt2img
from studio.ui.components import ImageMaskPaths, ImagePath, RawNumber
from studio.ui.context import UIContext, status_html
from studio.ui.controls import CUSTOM, SizeGroup, clamp_note, preset_sizes, result_columns


@pytest.fixture
def ui(studio):
    with gr.Blocks() as blocks:
        ctx = UIContext.create(studio)
        ctx.extra["header"] = gr.HTML()
        tabs = {"txt2img": tab_txt2img.create_ui(ctx), "img2img": tab_img2img.create_ui(ctx),
                "inpaint": tab_inpaint.create_ui(ctx), "turbo": tab_turbo.create_ui(ctx)}
        gallery = tab_gallery.create_ui(ctx)
        for t in tabs.values():
            t.wire()
    return types.SimpleNamespace(ctx=ctx, tabs=tabs, gallery=gallery, blocks=blocks, studio=studio)


@pytest.fixture(scope="module")
def app():
    import tempfile
    from pathlib import Path

    from studio.config import StudioConfig
    from studio.service import Studio
    from studio.ui.app import build_app

    return build_app(Studio(StudioConfig(data_dir=Path(tempfile.mkdtemp()) / "data", demo=True)))


def _values(tab, updates: dict):
    """The tab's values as the Generate handler gets them: defaults, then ``updates``."""
    loras = tab.lora_group().components() if tab.lora_group() is not None else []
    comps = list(dict.fromkeys([*tab.inputs(), *loras, tab.result.paths]))
    out = {c: getattr(c, "value", None) for c in comps}
    out.update(updates)
    return out


@pytest.fixture
def broken(tmp_path):
    path = tmp_path / "broken.png"
    path.write_text("this is not an image\n" * 10)
    return str(path)


# --- the components the page draws ---------------------------------------------------------------


@pytest.mark.parametrize("cls, base, kwargs", [
    (ImagePath, gr.Image, dict(label="Init image", height=300, sources=["upload", "clipboard"])),
    (ImageMaskPaths, gr.ImageMask, dict(label="Image", height=420, layers=False, transforms=(),
                                        brush=gr.Brush(default_size=24, colors=["#ffffff"]))),
    (RawNumber, gr.Number, dict(label="steps", info="denoising steps")),
])
def test_our_components_send_their_props_and_use_gradios_own_frontend(cls, base, kwargs):
    """Gradio reads the props from the constructor: a (*args, **kwargs) subclass sent none (the
    editor lost its brush, height and layers setting), and counted as a custom component whose
    files the page fetched one by one, each printing a line in the server's console."""
    with gr.Blocks():
        ours, theirs = cls(**kwargs), base(**kwargs)
    mine, gradio = ours.get_config(), theirs.get_config()
    assert set(mine) == set(gradio)
    for key in kwargs:
        assert mine[key] == gradio[key], key
    assert ours.get_block_name() == theirs.get_block_name()


# --- item 1: a corrupt upload, on arrival ---------------------------------------------------------


def test_check_image_gives_the_engines_message(studio, broken, tmp_path):
    from PIL import Image

    from studio.errors import ValidationError

    with pytest.raises(ValidationError, match=r"The init image \(broken\.png\) is not an image the studio can read"):
        studio.check_image(broken, "init_image")
    with pytest.raises(ValidationError, match=r"The mask \(broken\.png\)") as e:
        studio.check_image(broken, "mask_image")
    assert e.value.field == "mask_image"
    good = tmp_path / "ok.png"
    Image.new("RGB", (320, 200)).save(good)
    assert studio.check_image(str(good)) == (320, 200)


def test_every_image_input_checks_its_upload(ui, broken):
    checked = {(t.mode, c.elem_id, f) for t in ui.tabs.values() for c, f in t.image_checks()}
    assert checked == {("img2img", "img2img-init", "init_image"), ("inpaint", "inpaint-editor", "init_image"),
                       ("inpaint", "inpaint-mask-upload", "mask_image")}
    for t in ui.tabs.values():
        for component, field in t.image_checks():
            assert any(component._id in [tid for tid, ev in fn.targets if ev == "upload"]
                       for fn in ui.blocks.fns.values())
            value = {"background": broken, "layers": []} if isinstance(component, ImageMaskPaths) else broken
            with pytest.raises(gr.Error, match=r"broken\.png\) is not an image"):
                t._check_upload(field)(value)
            t._check_upload(field)(None)  # an emptied box is fine


# --- item 6: a clamped slider value is said ------------------------------------------------------


def test_clamp_note():
    assert clamp_note("Steps", 1, 150, 0) == "Steps 0 is below 1: it was set to 1."
    assert clamp_note("Guidance (CFG)", 0, 30, 99.5) == "Guidance (CFG) 99.5 is above 30: it was set to 30."
    assert clamp_note("Steps", 1, 150, 20) is None
    assert clamp_note("Steps", 1, 150, "") is None and clamp_note("Steps", 1, 150, None) is None


def test_every_limit_slider_says_its_clamp(app):
    """Each slider has a queued ``release`` handler that gets the raw typed value."""
    sliders = [b for b in app.blocks.values() if isinstance(b, gr.Slider)]
    assert len(sliders) >= 25
    for s in sliders:
        fns = [fn for fn in app.fns.values() if (s._id, "release") in [tuple(t) for t in fn.targets]]
        assert len(fns) == 1, s.elem_id
        fn = fns[0]
        assert fn.preprocess is False and fn.queue is not False and fn.concurrency_limit is None, s.elem_id


def test_handlers_that_toast_are_queued(app):
    """gr.Info / gr.Warning / a studio call's gr.Error outside the queue are printed on the server's
    console instead of shown to the user."""
    toasting = {"Info", "Warning", "Success", "call", "Error"}
    wrong = []
    for fn in app.fns.values():
        code = getattr(fn.fn, "__code__", None)
        if fn.queue is False and code is not None and toasting & set(code.co_names):
            wrong.append(getattr(fn.fn, "__qualname__", fn.fn))
    assert not wrong, wrong


# --- item 3: results whole, batches as a grid ----------------------------------------------------


def test_results_are_contained_and_batches_a_grid(ui):
    for t in ui.tabs.values():
        g = t.result.gallery
        assert g.object_fit == "contain" and "result-gallery" in g.elem_classes, t.mode
    assert [result_columns(n) for n in (1, 2, 4, 5, 9, 10, 40)] == [1, 2, 2, 3, 3, 4, 4]
    css = (tab_txt2img.__file__.rsplit("/", 1)[0] + "/style.css")
    text = open(css).read()
    assert ".result-gallery .thumbnail-item img { object-fit: contain" in text


# --- item 4: presets the model accepts -----------------------------------------------------------


def test_presets_scale_to_the_models_largest_side():
    full = preset_sizes(MAX_SIDE)
    assert list(full.values()) == list(ASPECT_PRESETS.values())
    small = preset_sizes(1024)
    assert small["16:9"] == (1024, 592) and small["9:16"] == (592, 1024) and small["1:1"] == (1024, 1024)
    assert all(max(wh) <= 1024 and wh[0] % 16 == 0 and wh[1] % 16 == 0 for wh in small.values())
    with gr.Blocks():
        g = SizeGroup("t", limit=lambda: (SizeRules(max_side=1024), "SD3.5 Large Turbo (tiny demo)"))
    labels = [c[0] for c in g.aspect.choices]
    assert "16:9 (1024×592)" in labels and "16:9 (1344×768)" not in labels
    assert "1024 px" in g.aspect.info and "SD3.5 Large Turbo (tiny demo)" in g.aspect.info
    assert g.size("16:9", 1024, 1024) == (1024, 592)
    assert g.size("16:9 (1344×768)", 0, 0) == (1024, 592)  # a catalog label still maps to its ratio
    assert g.size(CUSTOM, 320, 256) == (320, 256)


def test_max_side_comes_from_the_model(studio, tiny_family):
    from studio.config import StudioConfig
    from studio.service import Studio

    assert studio.max_side_for(TURBO_VARIANT) == 1024  # the tiny Turbo's pos_embed_max_size 64
    assert studio.max_side_for("sd3.5-medium") == 2048
    real = Studio(StudioConfig(data_dir=studio.config.data_dir.parent / "real"))
    assert real.max_side_for(TURBO_VARIANT) == MAX_SIDE  # the catalog's Large: 192 × 2 × 8 ≥ 2048


def test_turbo_tab_offers_presets_its_model_accepts(ui):
    t = ui.tabs["turbo"]
    labels = [c[0] for c in t.size.refresh()["choices"]]
    assert "16:9 (1024×592)" in labels
    req = t.request(_values(t, {t.size.aspect: "16:9", t.prompt_row.prompt: "x"}))
    assert (req.width, req.height) == (1024, 592)


# --- item 11: after an error, the Info box says why; the header says the model is loading -------


def test_a_refusal_is_said_in_the_info_box(ui, broken):
    t = ui.tabs["inpaint"]
    r = t.result
    values = _values(t, {t.editor: {"background": broken, "layers": [], "composite": None},
                           t.prompt_row.prompt: "x", r.paths: ["/earlier.png"]})
    gen = t.stream(values, types.SimpleNamespace(session_hash="s"))
    first = next(gen)
    assert first[r.info].startswith("Not generated: The init image (broken.png) is not an image")
    assert "previous run" in first[r.info]
    with pytest.raises(gr.Error):
        next(gen)


def test_the_header_says_the_model_is_loading(ui):
    assert ui.studio.current is None
    t = ui.tabs["txt2img"]
    gen = t.stream(_values(t, {t.prompt_row.prompt: "x"}), types.SimpleNamespace(session_hash="s"))
    first = next(gen)
    header = first[ui.ctx.extra["header"]]
    gen.close()  # before the job starts: nothing is generated
    assert "Loading SD3.5 Medium (tiny demo)…" in header and "sd-dot-busy" in header
    assert "No model loaded" in status_html(ui.studio)


# --- item 11: the gallery, the LoRA panel, Turbo's LoRAs ------------------------------------------


def test_a_search_that_finds_nothing_clears_the_selected_panel(ui):
    g = ui.gallery
    out = g._list("no such words", "", "", False, 0, types.SimpleNamespace())
    assert out[g.detail_image] is None and out[g.selected_id] is None and out[g.detail_info] == ""
    assert out[g.reuse_btn]["interactive"] is False
    assert g.detail_image in g._list_outputs()


def test_an_empty_lora_panel_says_where_loras_go(ui):
    for t in ui.tabs.values():
        g = t.lora_group()
        assert g is not None, t.mode  # Turbo too
        hint = g.hint([])
        assert str(ui.studio.config.loras_dir) in hint and "Add LoRA file" in hint
        assert g.hint(["style-a"]) == ""
    ui.studio.shared = True
    assert UIContext.create(ui.studio).lora_where() == "<data-dir>/loras"  # no server path when shared


def test_turbo_sends_its_loras(ui):
    t = ui.tabs["turbo"]
    name, weight = t.lora_group().slots[0]
    req = t.request(_values(t, {t.prompt_row.prompt: "x", name: "style-a", weight: 0.5}))
    assert req.loras == [("style-a", 0.5)]


# --- item 9: Models & Memory ---------------------------------------------------------------------


def test_the_demo_plan_says_how_the_demo_loads(studio):
    from studio.hardware import detect_hardware

    hw = detect_hardware(ram_gb=2)  # nothing real fits in 2 GB
    html = tab_models.plan_html(hw, "sd3.5-large", "auto", studio=studio)
    assert "does not fit" in html and "(the real weights, on this machine)" in html
    assert "Demo: the tiny models load as <b>cpu-fp32</b>" in html
    assert "default precision" in html
    assert "Demo:" not in tab_models.plan_html(hw, "sd3.5-large", "auto")  # not outside demo mode


def test_check_without_a_token_says_so(monkeypatch):
    import huggingface_hub

    shown = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(gr, "Warning", lambda message, **kw: shown.append(message))
    text = tab_models.token_check()
    assert "no token is saved" in text and text != tab_models.token_status()
    assert shown and "No Hugging Face token" in shown[0]


def test_the_source_placeholder_follows_the_variant():
    assert "stabilityai/stable-diffusion-3.5-large ·" in tab_models.source_placeholder("sd3.5-large")
    assert "sd3.5_large_turbo.safetensors" in tab_models.source_placeholder("sd3.5-large-turbo")
    assert "stable-diffusion-3.5-medium" in tab_models.source_placeholder(None)


def test_the_mode_filter_reads_the_modes(ui):
    from studio.engine.limits import MODES

    assert [v for _, v in ui.gallery.mode.choices][1:] == list(MODES)
    assert "inpaint" in MODES and LIMITS["steps"].lo == 1
