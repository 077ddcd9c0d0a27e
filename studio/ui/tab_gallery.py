"""Gallery: thumbnails newest first, search and filters, a detail view (star, delete, reuse
parameters, send to img2img, download the original PNG) and "read PNG info" for any file.

Metadata is shown only in text components (Textbox, JSON): hostile prompts never render as HTML.
"""

from __future__ import annotations

import gradio as gr

from studio.catalog import VARIANTS
from studio.engine.limits import MODES
from studio.metadata import to_infotext
from studio.ui.controls import slider
from studio.ui.jobs import call, gpu_event


def _caption(item) -> str:
    prompt = " ".join((item.prompt or "").split())
    return (prompt[:60] + "…") if len(prompt) > 60 else (prompt or "(no prompt)")


# --- the tab ---------------------------------------------------------------------------------


class GalleryTab:
    """The gallery tab's components and handlers."""
    tab_id = "gallery"

    def __init__(self, ctx):
        self.ctx = ctx
        studio = ctx.studio
        self.page = gr.State(0)
        self.ids = gr.State([])
        self.selected_id = gr.State(None)
        self.selected_fields = gr.State(None)  # metadata of the selected image (for reuse)
        self.png_fields = gr.State(None)  # fields read from a dropped PNG
        self.png_kind = gr.State("studio")  # which tool wrote them (the reader's verdict), for name mapping
        with gr.Row(equal_height=True, elem_classes=["gallery-filters"]):
            self.query = gr.Textbox(label="Search prompts", placeholder="words in the prompt…", scale=4,
                                    elem_id="gallery-query")
            self.variant = gr.Dropdown([("All models", "")] + [(v.label, k) for k, v in VARIANTS.items()],
                                       value="", label="Model", scale=2, elem_id="gallery-variant")
            self.mode = gr.Dropdown([("All modes", "")] + [(m, m) for m in MODES], value="", label="Mode",
                                    scale=2, elem_id="gallery-mode")
            self.starred = gr.Checkbox(label="Starred only", value=False, scale=1, min_width=150,
                                       elem_id="gallery-starred")
            self.refresh = gr.Button("Refresh", scale=0, min_width=100, size="md", elem_id="gallery-refresh",
                                     elem_classes=["align-end"])
        with gr.Row(equal_height=False):
            with gr.Column(scale=7, min_width=360):
                self.grid = gr.Gallery(label="Images (newest first)", show_label=False, columns=4, height=560,
                                       object_fit="cover", allow_preview=False, interactive=False,
                                       fit_columns=False, elem_id="gallery-grid", buttons=[])
                with gr.Row(equal_height=True, elem_classes=["pager"]):
                    self.prev = gr.Button("← Newer", size="sm", scale=0, min_width=100, elem_id="gallery-prev")
                    self.page_label = gr.Markdown("", elem_id="gallery-page", elem_classes=["page-label"])
                    self.next = gr.Button("Older →", size="sm", scale=0, min_width=100, elem_id="gallery-next")
            with gr.Column(scale=5, min_width=320, elem_classes=["detail-col"]):
                self.detail_image = gr.Image(label="Selected", type="filepath", interactive=False,
                                             height=320, elem_id="gallery-detail-image",
                                             buttons=["fullscreen"])
                self.detail_info = gr.Textbox(label="Parameters", lines=4, max_lines=12, interactive=False,
                                              elem_id="gallery-detail-info", buttons=["copy"])
                with gr.Row():
                    self.star_btn = gr.Button("☆ Star", size="sm", interactive=False, elem_id="gallery-star")
                    self.reuse_btn = gr.Button("Reuse parameters", size="sm", variant="primary",
                                               interactive=False, elem_id="gallery-reuse")
                    self.send_btn = gr.Button("Send to img2img", size="sm", interactive=False,
                                              elem_id="gallery-send-img2img")
                with gr.Row():
                    self.download = gr.DownloadButton("Download PNG", size="sm", interactive=False,
                                                      elem_id="gallery-download")
                    self.delete_btn = gr.Button("Delete", size="sm", variant="stop", interactive=False,
                                                elem_id="gallery-delete")
                with gr.Row(visible=False, elem_classes=["confirm-row"]) as self.confirm_row:
                    gr.Markdown("Delete this image and its file for good?")
                    self.confirm_delete = gr.Button("Yes, delete", size="sm", variant="stop",
                                                    elem_id="gallery-confirm-delete")
                    self.cancel_delete = gr.Button("Keep it", size="sm", elem_id="gallery-cancel-delete")
                with gr.Accordion("Upscale", open=False, elem_id="gallery-upscale") as self.upscale_panel:
                    with gr.Row():
                        self.upscaler = gr.Dropdown(studio.upscaler_names(), value="Lanczos", label="Upscaler",
                                                    elem_id="gallery-upscaler")
                        self.upscale_by = slider("upscale_scale", elem_id="gallery-upscale-by")
                    with gr.Row():
                        self.refine = gr.Checkbox(False, label="Refine (img2img over the upscaled image)",
                                                  elem_id="gallery-refine")
                        self.refine_denoise = slider("refine_denoise", elem_id="gallery-refine-denoise")
                    self.upscale_file = gr.File(None, type="filepath", file_types=["image"], height=90,
                                                label="…or upscale an upload instead of the selected image",
                                                elem_id="gallery-upscale-file")
                    self.upscale_btn = gr.Button("Upscale", size="sm", elem_id="gallery-upscale-btn")
                with gr.Accordion("Full metadata", open=False):
                    self.detail_json = gr.JSON(label="Metadata", elem_id="gallery-detail-json")
        with gr.Accordion("Read PNG info — drop any PNG (ours, A1111, ComfyUI, InvokeAI)", open=False,
                          elem_id="pnginfo-accordion"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=260):
                    self.png_file = gr.File(label="PNG file", file_types=[".png", "image"], type="filepath",
                                            elem_id="pnginfo-file", height=160)
                    self.png_reuse = gr.Button("Reuse these parameters", size="sm", interactive=False,
                                               elem_id="pnginfo-reuse")
                with gr.Column(scale=2, min_width=320):
                    self.png_source = gr.Textbox(label="Written by", interactive=False, elem_id="pnginfo-source")
                    self.png_text = gr.Textbox(label="Parameters (as text)", lines=5, max_lines=16,
                                               interactive=False, elem_id="pnginfo-text", buttons=["copy"])
                    self.png_json = gr.JSON(label="Fields", elem_id="pnginfo-json")

        self._wire(studio)

    # -- handlers --

    def _list(self, query, variant, mode, starred_only, page, request: gr.Request):
        studio = self.ctx.studio
        owner = studio.owner_for(request)
        p = call(studio.list_images, owner, query, variant, mode, starred_only, page)
        if page and not p.items and p.total:  # the page emptied (deletes): go to the last one
            p = call(studio.list_images, owner, query, variant, mode, starred_only, p.pages - 1)
        value = [(str(i.thumb_path if i.thumb_path and i.thumb_path.is_file() else i.path), _caption(i))
                 for i in p.items]
        label = f"Page {p.page + 1} of {p.pages} · {p.total} image{'s' if p.total != 1 else ''}"
        if not p.total:
            label = "No images yet — generate some, or clear the filters." if not (query or variant or mode or starred_only) \
                else "No images match these filters."
        out = {self.grid: value, self.ids: [i.id for i in p.items], self.page: p.page,
               self.page_label: label, self.prev: gr.update(interactive=p.page > 0),
               self.next: gr.update(interactive=p.page + 1 < p.pages)}
        if not p.items:  # nothing listed: the Selected panel must not keep showing an image
            out.update(self._empty_detail())
        return out

    def _list_outputs(self):
        return [self.grid, self.ids, self.page, self.page_label, self.prev, self.next, *self._detail_outputs()]

    def _filters(self):
        return [self.query, self.variant, self.mode, self.starred]

    def _detail(self, image_id, request: gr.Request):
        if not image_id:
            return self._empty_detail()
        studio = self.ctx.studio
        item = call(studio.get_image, image_id, studio.owner_for(request))
        return {
            self.selected_id: item.id,
            self.selected_fields: dict(item.metadata or {}),
            self.detail_image: str(item.path),
            self.detail_info: to_infotext(item.metadata or {}),
            self.detail_json: item.metadata or {},
            self.star_btn: gr.update(value="★ Starred" if item.starred else "☆ Star", interactive=True),
            self.reuse_btn: gr.update(interactive=True),
            self.send_btn: gr.update(interactive=True),
            self.download: gr.update(value=str(item.path), interactive=True),
            self.delete_btn: gr.update(interactive=True),
            self.confirm_row: gr.update(visible=False),
        }

    def _empty_detail(self):
        return {
            self.selected_id: None, self.selected_fields: None, self.detail_image: None,
            self.detail_info: "", self.detail_json: None,
            self.star_btn: gr.update(value="☆ Star", interactive=False),
            self.reuse_btn: gr.update(interactive=False), self.send_btn: gr.update(interactive=False),
            self.download: gr.update(value=None, interactive=False),
            self.delete_btn: gr.update(interactive=False), self.confirm_row: gr.update(visible=False),
        }

    def _detail_outputs(self):
        return [self.selected_id, self.selected_fields, self.detail_image, self.detail_info, self.detail_json,
                self.star_btn, self.reuse_btn, self.send_btn, self.download, self.delete_btn, self.confirm_row]

    def _select(self, ids, evt: gr.SelectData, request: gr.Request):
        index = evt.index if isinstance(evt.index, int) else 0
        if not ids or index >= len(ids):
            return self._empty_detail()
        return self._detail(ids[index], request)

    def _toggle_star(self, image_id, request: gr.Request):
        studio = self.ctx.studio
        owner = studio.owner_for(request)
        item = call(studio.get_image, image_id, owner)
        starred = call(studio.star_image, image_id, not item.starred, owner)
        return gr.update(value="★ Starred" if starred else "☆ Star")

    def _delete(self, image_id, request: gr.Request):
        studio = self.ctx.studio
        call(studio.delete_image, image_id, studio.owner_for(request))
        gr.Info("Deleted.")
        return self._empty_detail()

    def _upscale(self, image_id, upscaler, scale, refine, denoise, upload, request: gr.Request):
        """Upscale an upload, else the selected image (refined by img2img when asked); the result
        is a new gallery image (naming its parent when it had one), and the detail view shows it."""
        studio = self.ctx.studio
        owner = studio.owner_for(request)
        if not upload and not image_id:
            raise gr.Error("Select an image in the gallery, or upload one, to upscale.", print_exception=False)
        source = {"image": upload} if upload else {"image_id": image_id}
        res = call(studio.upscale, **source, upscaler=upscaler, scale=scale,
                   refine_denoise=denoise if refine else None, owner=owner)
        for note in res.notes:
            gr.Warning(note, duration=8)
        done = [i for i in res.images if i.path]
        if not done:
            raise gr.Error("The upscaled image was not saved.", print_exception=False)
        w, h = done[0].image.size
        gr.Info(f"Upscaled to {w}×{h}: saved as a new image in the gallery.")
        return self._detail(done[0].id, request)

    def _read_png(self, path):
        if not path:
            return {self.png_source: "", self.png_text: "", self.png_json: None, self.png_fields: None,
                    self.png_kind: "studio", self.png_reuse: gr.update(interactive=False)}
        info = call(self.ctx.studio.read_png_info, path)
        source = {"studio": "SD3.5 Studio", "a1111": "A1111 / Forge / SD.Next (infotext)",
                  "comfyui": "ComfyUI", "invokeai": "InvokeAI", "none": "No generation metadata found"}
        text = source.get(info.source, info.source)
        if info.error:
            text += f" — {info.error}"
        return {self.png_source: text, self.png_text: info.infotext, self.png_json: info.fields or None,
                self.png_fields: info.fields or None, self.png_kind: info.source,
                self.png_reuse: gr.update(interactive=bool(info.fields))}

    # -- wiring --

    def _wire(self, studio):
        lst, filters = self._list_outputs(), self._filters()
        kw = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")
        for trigger in (self.refresh.click, self.query.submit, self.variant.change, self.mode.change,
                        self.starred.change):
            trigger(self._first_page, filters, lst, **kw)
        self.prev.click(self._step(-1), [*filters, self.page], lst, **kw)
        self.next.click(self._step(+1), [*filters, self.page], lst, **kw)
        self.grid.select(self._select, self.ids, self._detail_outputs(), **kw)
        self.star_btn.click(self._toggle_star, self.selected_id, self.star_btn, **kw).then(
            self._list, [*filters, self.page], lst, **kw)
        self.delete_btn.click(lambda: gr.update(visible=True), None, self.confirm_row, queue=False,
                              api_visibility="private")
        self.cancel_delete.click(lambda: gr.update(visible=False), None, self.confirm_row, queue=False,
                                 api_visibility="private")
        self.confirm_delete.click(self._delete, self.selected_id, self._detail_outputs(), **kw).then(
            self._list, [*filters, self.page], lst, **kw)
        self.upscale_panel.expand(
            lambda: gr.update(choices=call(studio.upscaler_names)), None, self.upscaler, **kw)
        gpu_event(self.upscale_btn.click, self._upscale,
                  [self.selected_id, self.upscaler, self.upscale_by, self.refine, self.refine_denoise,
                   self.upscale_file],
                  self._detail_outputs(), api_visibility="private", show_progress="full",
                  show_progress_on=[self.detail_image]).then(self._list, [*filters, self.page], lst, **kw)
        self.png_file.change(self._read_png, self.png_file,
                             [self.png_source, self.png_text, self.png_json, self.png_fields, self.png_kind, self.png_reuse],
                             **kw)

    def _first_page(self, query, variant, mode, starred_only, request: gr.Request):
        return self._list(query, variant, mode, starred_only, 0, request)

    def _step(self, delta):
        def step(query, variant, mode, starred_only, page, request: gr.Request):
            return self._list(query, variant, mode, starred_only, max(0, int(page or 0) + delta), request)
        return step

    def load_targets(self):
        """(fn, inputs, outputs) to refresh the grid when the tab opens."""
        return self._first_page, self._filters(), self._list_outputs()


def create_ui(ctx) -> GalleryTab:
    """Build the gallery tab."""
    return GalleryTab(ctx)
