"""The Gradio app: a header with the model status, one tab per module, the cross-tab wiring
("send to img2img", "reuse parameters", model changes) and the named API endpoints.

``build_app(studio)`` and ``launch_options()`` are what ``studio/server.py`` uses.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import api, tab_gallery, tab_img2img, tab_inpaint, tab_models, tab_turbo, tab_txt2img
from studio.metadata import request_fields

from .context import UIContext, status_html
from .jobs import call, gpu_event

CSS = (Path(__file__).with_name("style.css")).read_text()


def launch_options() -> dict:
    theme = gr.themes.Soft(
        primary_hue="indigo",
        secondary_hue="slate",
        neutral_hue="slate",
        font=["Inter", "ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
    ).set(
        block_radius="10px",
        button_large_radius="10px",
        block_title_background_fill="transparent",
        block_title_background_fill_dark="transparent",
        block_title_text_color="*neutral_700",
        block_title_text_color_dark="*neutral_200",
        block_title_padding="0",
        block_title_text_weight="600",
        block_label_background_fill="transparent",
        block_label_background_fill_dark="transparent",
        block_label_text_color="*neutral_600",
        block_label_text_color_dark="*neutral_300",
    )
    return {"theme": theme, "css": CSS}


def build_app(studio) -> gr.Blocks:
    ctx = UIContext.create(studio)
    with gr.Blocks(title="SD3.5 Studio", analytics_enabled=False, fill_width=True) as demo:
        header = gr.HTML(status_html(studio), elem_id="sd-header")
        ctx.extra["header"] = header
        with gr.Tabs(selected="txt2img", elem_id="sd-tabs") as tabs:
            ctx.tabs = tabs
            with gr.Tab("Text to image", id="txt2img", elem_id="tab-txt2img") as t_txt:
                txt = tab_txt2img.create_ui(ctx)
            with gr.Tab("Image to image", id="img2img", elem_id="tab-img2img") as t_img:
                img = tab_img2img.create_ui(ctx)
            with gr.Tab("Inpaint", id="inpaint", elem_id="tab-inpaint") as t_inpaint:
                inpaint = tab_inpaint.create_ui(ctx)
            with gr.Tab("Turbo", id="turbo", elem_id="tab-turbo") as t_turbo:
                turbo = tab_turbo.create_ui(ctx)
            with gr.Tab("Gallery", id="gallery", elem_id="tab-gallery") as t_gal:
                gal = tab_gallery.create_ui(ctx)
            with gr.Tab("Models & Memory", id="models", elem_id="tab-models") as t_models:
                models = tab_models.create_ui(ctx)
        gen_tabs = {"txt2img": txt, "img2img": img, "turbo": turbo, "inpaint": inpaint}
        for t in gen_tabs.values():
            t.wire()
        api.register(ctx)
        _wire_cross_tab(ctx, header, tabs, gen_tabs, gal, models, {"gallery": t_gal, "models": t_models,
                                                                  "txt2img": t_txt, "img2img": t_img,
                                                                  "turbo": t_turbo, "inpaint": t_inpaint})
        demo.load(lambda: status_html(studio), None, header, queue=False, api_visibility="private")
    return demo


def _wire_cross_tab(ctx, header, tabs, gen_tabs, gal, models, tab_blocks) -> None:
    studio = ctx.studio
    img = gen_tabs["img2img"]
    private = dict(api_visibility="private")

    # Send to img2img: from any result panel and from the gallery detail.
    def send_from_results(paths, selected):
        if not paths:
            raise gr.Error("Generate an image first.", print_exception=False)
        index = selected if isinstance(selected, int) and 0 <= selected < len(paths) else 0
        gr.Info("Sent to img2img.")
        return paths[index], gr.Tabs(selected="img2img")

    for t in gen_tabs.values():
        t.result.send_to_img2img.click(send_from_results, [t.result.paths, t.result.selected],
                                       [img.init_image, tabs], queue=False, **private)

    def send_from_gallery(image_id, request: gr.Request):
        path = call(studio.get_image, image_id, studio.owner_for(request)).path
        return str(path), gr.Tabs(selected="img2img")

    gal.send_btn.click(send_from_gallery, gal.selected_id, [img.init_image, tabs], concurrency_limit=None,
                       **private)

    # Reuse parameters: the same field registry for gallery metadata and dropped PNGs.
    targets = []
    for t in gen_tabs.values():
        targets += [c for c in t.reuse_targets() if c not in targets]

    def reuse(fields, inputs=None):
        """Fill the tab an image came from. ``fields`` are cleaned by the schema (a dropped PNG's
        metadata is data); ``inputs`` are the stored init image / mask, found by the gallery id
        after the owner check — never by anything a PNG says."""
        fields = request_fields(fields or {})
        if not fields:
            raise gr.Error("Select an image (or drop a PNG with metadata) first.", print_exception=False)
        mode = fields.get("mode") if fields.get("mode") in gen_tabs else "txt2img"
        target = gen_tabs[mode]
        out = target.apply_fields(fields, inputs or {})
        out[tabs] = gr.Tabs(selected=target.tab_id)
        more = "."
        if mode in ("img2img", "inpaint") and not (inputs or {}).get("init_image"):
            more = " (the init image is not stored with it: add one)."
        gr.Info(f"Parameters loaded into {target.tab_id}{more}")
        return out

    def reuse_selected(fields, image_id, request: gr.Request):
        inputs = call(studio.image_inputs, image_id, studio.owner_for(request)) if image_id else {}
        return reuse(fields, inputs)

    # queued (one at a time): reuse decodes the stored init image and mask for the editor
    gal.reuse_btn.click(reuse_selected, [gal.selected_fields, gal.selected_id], [*targets, tabs],
                        **private)
    gal.png_reuse.click(reuse, gal.png_fields, [*targets, tabs], **private)

    # Model changes: header, and the recommended steps / guidance / SLG offer in the main tabs.
    main_tabs = [gen_tabs["txt2img"], gen_tabs["img2img"], gen_tabs["inpaint"]]
    variant_targets = [c for t in main_tabs for c in t.variant_targets()]

    def load(variant, source, preset, progress=gr.Progress()):
        status = models.load(variant, source, preset, progress)
        ctx.main_variant = variant or ctx.main_variant
        out = {models.status: status, header: status_html(studio)}
        for t in main_tabs:
            out.update(t.variant_updates(variant))
        gr.Success(status.split(" · ")[0])
        return out

    gpu_event(models.load_btn.click, load, [models.variant, models.source, models.preset],
              [models.status, header, *variant_targets], show_progress="full",
              show_progress_on=[models.status], **private)

    def unload():
        return models.unload(), status_html(studio)

    gpu_event(models.unload_btn.click, unload, None, [models.status, header], **private)

    # Refresh on entering a tab; the memory readout ticks only while its tab is open.
    fn, inputs, outputs = gal.load_targets()
    tab_blocks["gallery"].select(fn, inputs, outputs, concurrency_limit=None, show_progress="hidden", **private)
    tab_blocks["models"].select(models.opened, [models.variant, models.preset], models.opened_targets(),
                                concurrency_limit=None, show_progress="hidden", **private)
    for name in ("txt2img", "img2img", "turbo", "inpaint", "gallery"):
        tab_blocks[name].select(lambda: gr.Timer(active=False), None, models.timer, queue=False, **private)
