"""The Gradio app: a header with the model status, one tab per module, the cross-tab wiring
("send to img2img", "reuse parameters", model changes) and the named API endpoints.

``build_app(studio)`` and ``launch_options()`` are what ``studio/server.py`` uses.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from dataclasses import dataclass

from . import api, tab_control, tab_gallery, tab_img2img, tab_inpaint, tab_models, tab_turbo, tab_txt2img
from studio.catalog import VARIANTS
from studio.engine.limits import IMAGE_MODES
from studio.metadata import clean, request_fields

from .context import UIContext, status_html
from .jobs import call, gpu_event

CSS = (Path(__file__).with_name("style.css")).read_text()


def launch_options() -> dict:
    """The theme and CSS ``launch()`` takes (Gradio 6: they belong to launch, not Blocks)."""
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
    """The whole page for ``studio``: the header, one tab per module, the cross-tab wiring and the API."""
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
            with gr.Tab("Control", id="control", elem_id="tab-control") as t_control:
                control = tab_control.create_ui(ctx)
            with gr.Tab("Gallery", id="gallery", elem_id="tab-gallery") as t_gal:
                gal = tab_gallery.create_ui(ctx)
            with gr.Tab("Models & Memory", id="models", elem_id="tab-models") as t_models:
                models = tab_models.create_ui(ctx)
        gen_tabs = {"txt2img": txt, "img2img": img, "turbo": turbo, "inpaint": inpaint, "control": control}
        for t in gen_tabs.values():
            t.wire()
        api.register(ctx)
        _wire_cross_tab(ctx, header, tabs, gen_tabs, gal, models, {"gallery": t_gal, "models": t_models,
                                                                  "txt2img": t_txt, "img2img": t_img,
                                                                  "turbo": t_turbo, "inpaint": t_inpaint,
                                                                  "control": t_control})
        size_updates, size_targets = ctx.extra["size_refresh"]
        demo.load(lambda: {header: status_html(studio), **size_updates()}, None, [header, *size_targets],
                  queue=False, api_visibility="private")
    return demo


TAB_NAMES = {"txt2img": "Text to image", "img2img": "Image to image", "inpaint": "Inpaint", "turbo": "Turbo",
             "control": "Control"}


@dataclass
class ReuseNote:
    """What "reuse parameters" did: the tab to open, what to say, the variant switched to."""

    tab: str
    text: str
    switched: str | None = None


def reuse_updates(ctx, gen_tabs: dict, raw, inputs: dict | None = None,
                  source: str = "studio") -> tuple[dict, ReuseNote]:
    """The updates "reuse parameters" makes, set so that Generate gives the same pixels again.

    ``raw`` is an image's metadata (the gallery's, or a dropped PNG's: data, cleaned by the
    schema); ``inputs`` its stored init image and mask (by gallery id, owner-checked). It fills
    the tab the image came from; switches the main tabs to the variant it was made with, and
    says so; and asks for the run it came from — batch count 1, its batch size and the run's
    first seed — since an image of a batch is not bit for bit the same image made alone.
    Peer names (A1111's samplers, ComfyUI's schedulers, styles, ControlNets) are mapped by
    ``Studio.reuse_fields`` (``source``: the tool that wrote the PNG); what did not map is said.
    An image made with a ControlNet opens the Control tab."""
    fields, said = call(ctx.studio.reuse_fields, raw or {}, source)
    if not fields:
        raise gr.Error("Select an image (or drop a PNG with metadata) first.", print_exception=False)
    meta = clean(raw)
    inputs = inputs or {}
    mode = fields.get("mode") if fields.get("mode") in gen_tabs else "txt2img"
    if mode == "txt2img" and fields.get("controls") and "control" in gen_tabs:
        mode = "control"
    target = gen_tabs[mode]
    said = [n.rstrip(".") for n in said]
    size = fields.get("batch_size") if isinstance(fields.get("batch_size"), int) else 1
    size = max(1, size) if "image_index" in meta else 1  # a foreign PNG's seed is its own
    index = meta.get("image_index") or 0
    fields.update(batch_size=size, batch_count=1)
    if isinstance(fields.get("seed"), int) and 0 < index < size:
        fields["seed"] -= index
        said.append(f"it is image {index + 1} of {size} made from seed {fields['seed']}, so that run is set up again")
    out: dict = {}
    switched = None
    variant = fields.get("variant")
    if mode != "turbo" and variant in VARIANTS and variant != ctx.effective_variant():
        was = VARIANTS.get(ctx.effective_variant())
        ctx.main_variant = switched = variant
        for t in gen_tabs.values():
            if t.mode != "turbo":
                out.update(t.variant_updates(variant))
                if t.size is not None:
                    out[t.size.aspect] = t.size.refresh()
        said.append(f"it was made with {VARIANTS[variant].label}: the tabs now use it instead of "
                    f"{was.label if was else 'the loaded model'} (it loads on Generate)")
    for comp, value in target.apply_fields(fields, inputs).items():
        prev = out.get(comp)
        out[comp] = {**prev, "value": value} if isinstance(prev, dict) and not isinstance(value, dict) else value
    if mode in IMAGE_MODES and not inputs.get("init_image"):
        said.append("the init image is not stored with it: add one")
    text = f"Parameters loaded into {TAB_NAMES.get(target.tab_id, target.tab_id)}"
    text += (": " + "; ".join(said) + ".") if said else "."
    return out, ReuseNote(target.tab_id, text, switched)


def _wire_cross_tab(ctx, header, tabs, gen_tabs, gal, models, tab_blocks) -> None:
    studio = ctx.studio
    img = gen_tabs["img2img"]
    private = dict(api_visibility="private")

    # Send to img2img: from any result panel and from the gallery detail, with the prompt and
    # negative prompt the image was made with (as A1111 does).
    send_targets = [img.init_image, img.prompt_row.prompt, img.prompt_row.negative, tabs]

    def send_from_results(paths, texts, selected):
        if not paths:
            raise gr.Error("Generate an image first.", print_exception=False)
        index = selected if isinstance(selected, int) and 0 <= selected < len(paths) else 0
        prompt, negative = texts[index] if isinstance(texts, list) and index < len(texts) else (gr.update(),) * 2
        gr.Info("Sent to img2img with its prompt.")
        return paths[index], prompt, negative, gr.Tabs(selected="img2img")

    for t in gen_tabs.values():
        t.result.send_to_img2img.click(send_from_results, [t.result.paths, t.result.texts, t.result.selected],
                                       send_targets, concurrency_limit=None, **private)

    def send_from_gallery(image_id, fields, request: gr.Request):
        path = call(studio.get_image, image_id, studio.owner_for(request)).path
        fields = request_fields(fields or {})
        gr.Info("Sent to img2img with its prompt.")
        return (str(path), fields.get("prompt", ""), fields.get("negative_prompt", ""),
                gr.Tabs(selected="img2img"))

    gal.send_btn.click(send_from_gallery, [gal.selected_id, gal.selected_fields], send_targets,
                       concurrency_limit=None, **private)

    # Reuse parameters: the same field registry for gallery metadata and dropped PNGs.
    targets = [models.variant]
    for t in gen_tabs.values():
        targets += [c for c in [*t.reuse_targets(), *t.variant_targets()] if c not in targets]
        if t.size is not None and t.size.aspect not in targets:
            targets.append(t.size.aspect)

    def reuse(fields, inputs=None, source="studio"):
        """Fill the tab an image came from. ``fields`` are cleaned by the schema (a dropped PNG's
        metadata is data); ``inputs`` are the stored init image / mask / control images, found by
        the gallery id after the owner check — never by anything a PNG says."""
        out, message = reuse_updates(ctx, gen_tabs, fields, inputs, source if isinstance(source, str) else "studio")
        out[tabs] = gr.Tabs(selected=message.tab)
        if message.switched:
            out[models.variant] = message.switched
        gr.Info(message.text)
        return out

    def reuse_selected(fields, image_id, request: gr.Request):
        inputs = call(studio.image_inputs, image_id, studio.owner_for(request)) if image_id else {}
        return reuse(fields, inputs)

    # queued (one at a time): reuse decodes the stored init image and mask for the editor
    gal.reuse_btn.click(reuse_selected, [gal.selected_fields, gal.selected_id], [*targets, tabs],
                        **private)
    gal.png_reuse.click(reuse, [gal.png_fields, gr.State(None), gal.png_kind], [*targets, tabs], **private)

    # Model changes: header, and the recommended steps / guidance / SLG offer in the main tabs.
    main_tabs = [gen_tabs["txt2img"], gen_tabs["img2img"], gen_tabs["inpaint"], gen_tabs["control"]]
    variant_targets = [c for t in main_tabs for c in t.variant_targets()]

    sizes = [t.size for t in gen_tabs.values() if t.size is not None]

    def size_updates() -> dict:
        """Each tab's size presets, fitted to the model it generates with now."""
        return {g.aspect: g.refresh() for g in sizes}

    def load(variant, source, preset, progress=gr.Progress()):
        status = models.load(variant, source, preset, progress)
        ctx.main_variant = variant or ctx.main_variant
        out = {models.status: status, header: status_html(studio), **size_updates()}
        for t in main_tabs:
            out.update(t.variant_updates(variant))
        gr.Success(status.split(" · ")[0])
        return out

    gpu_event(models.load_btn.click, load, [models.variant, models.source, models.preset],
              [models.status, header, *variant_targets, *(g.aspect for g in sizes)], show_progress="full",
              show_progress_on=[models.status], **private)
    ctx.extra["size_refresh"] = (size_updates, [g.aspect for g in sizes])

    def unload():
        return models.unload(), status_html(studio)

    gpu_event(models.unload_btn.click, unload, None, [models.status, header], **private)

    # Refresh on entering a tab; the memory readout ticks only while its tab is open.
    fn, inputs, outputs = gal.load_targets()
    tab_blocks["gallery"].select(fn, inputs, outputs, concurrency_limit=None, show_progress="hidden", **private)
    tab_blocks["models"].select(models.opened, [models.variant, models.preset], models.opened_targets(),
                                concurrency_limit=None, show_progress="hidden", **private)
    for name in ("txt2img", "img2img", "turbo", "inpaint", "control", "gallery"):
        tab_blocks[name].select(lambda: gr.Timer(active=False), None, models.timer, queue=False, **private)
