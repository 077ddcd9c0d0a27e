"""The named API endpoints: simple blocking functions with plain inputs, for gradio_client and
scripts. They are wired to hidden components (never shown in the page), so their parameter names
are clean and independent of the UI layout:

    /txt2img(prompt, negative_prompt, width, height, steps, guidance, seed, batch_count,
             batch_size, slg, max_sequence_length, shift, loras) -> (images, seed, info)
    /img2img(init_image, prompt, negative_prompt, strength, width, height, steps, guidance, seed,
             batch_count, batch_size, max_sequence_length, shift, loras) -> (images, seed, info)
    /inpaint(image, mask, prompt, negative_prompt, strength, mask_blur, only_masked, padding, steps,
             guidance, seed, batch_count, batch_size, max_sequence_length, shift, loras)
             -> (images, seed, info)
    /load_lora(name, file) -> {name, sha256, size, text_encoders, loaded}
    /list_loras() -> {loras: [{name, sha256, size, text_encoders, error}], active}
    /gallery_mask(image_id) -> the inpaint mask of a gallery image (PNG, white = repainted)
    /turbo(prompt, width, height, steps, seed, batch_count, batch_size) -> (images, seed, info)
    /load_model(variant, source, preset) -> status
    /gallery_list(query, variant, mode, starred_only, page, page_size) -> {total, page, pages, items}
    /gallery_get(image_id) -> (png, metadata, infotext)
    /gallery_star(image_id, starred) -> {id, starred}
    /gallery_delete(image_id) -> {id, deleted}
    /read_png_info(file) -> (fields, infotext, source, error)

None for width/height/steps/guidance means "the model's native size / the variant's
recommendation"; seed -1 is random. Bad values come back as errors with the engine's message.
``loras`` is text: ``name:0.8, other`` (weight 1 when left out) or ``<lora:name:0.8>`` tags; the
names are files in the data dir's ``loras`` folder (see /list_loras, /load_lora). An inpaint
``mask`` is white (or opaque, for a PNG with alpha) where the image is repainted.
"""

from __future__ import annotations

import gradio as gr

from ..catalog import VARIANTS
from ..engine import GenerationRequest
from ..lora import parse_selection
from . import tab_gallery
from .jobs import gpu_event
from .tab_models import load_model

SLG_CHOICES = ["auto", "on", "off"]


def _slg(value):
    return {"on": True, "off": False}.get(str(value or "auto").lower())


def _num(value, kind=int):
    """API numbers arrive as numbers or None; anything else goes to the engine to refuse."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # exact, however large: the engine names the range
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        return value
    return int(f) if kind is int and f.is_integer() else f


def _result(res):
    return [i.path for i in res.images if i.path], res.seed, res.info


def register(ctx) -> None:
    studio = ctx.studio
    jobs = ctx.jobs

    def txt2img(prompt, negative_prompt=None, width=None, height=None, steps=None, guidance=None, seed=None,
                batch_count=None, batch_size=None, slg=None, max_sequence_length=None, shift=None,
                loras=None, request: gr.Request = None, progress=gr.Progress()):
        req = GenerationRequest(
            prompt=prompt or "", negative_prompt=negative_prompt or "", mode="txt2img",
            width=_num(width), height=_num(height), steps=_num(steps), guidance=_num(guidance, float),
            seed=-1 if seed is None else _num(seed), batch_count=1 if batch_count is None else _num(batch_count),
            batch_size=1 if batch_size is None else _num(batch_size), slg=_slg(slg),
            max_sequence_length=256 if max_sequence_length is None else _num(max_sequence_length),
            shift=_num(shift, float), variant=ctx.variant_for_request(), loras=parse_selection(loras),
        )
        res = jobs.run(req, request, progress)
        if res.images:
            ctx.remember(res.images[0].metadata.get("variant"))
        return _result(res)

    def img2img(init_image=None, prompt=None, negative_prompt=None, strength=None, width=None, height=None,
                steps=None, guidance=None, seed=None, batch_count=None, batch_size=None,
                max_sequence_length=None, shift=None, loras=None, request: gr.Request = None,
                progress=gr.Progress()):
        req = GenerationRequest(
            prompt=prompt or "", negative_prompt=negative_prompt or "", mode="img2img",
            init_image=init_image or None, strength=0.6 if strength is None else _num(strength, float),
            width=_num(width), height=_num(height), steps=_num(steps), guidance=_num(guidance, float),
            seed=-1 if seed is None else _num(seed), batch_count=1 if batch_count is None else _num(batch_count),
            batch_size=1 if batch_size is None else _num(batch_size),
            max_sequence_length=256 if max_sequence_length is None else _num(max_sequence_length),
            shift=_num(shift, float), variant=ctx.variant_for_request(), loras=parse_selection(loras),
        )
        return _result(jobs.run(req, request, progress))

    def inpaint(image=None, mask=None, prompt=None, negative_prompt=None, strength=None, mask_blur=None,
                only_masked=None, padding=None, steps=None, guidance=None, seed=None, batch_count=None,
                batch_size=None, max_sequence_length=None, shift=None, loras=None, request: gr.Request = None,
                progress=gr.Progress()):
        req = GenerationRequest(
            prompt=prompt or "", negative_prompt=negative_prompt or "", mode="inpaint",
            init_image=image or None, mask_image=mask or None,
            strength=0.85 if strength is None else _num(strength, float),
            mask_blur=4 if mask_blur is None else _num(mask_blur), only_masked=bool(only_masked),
            padding=32 if padding is None else _num(padding), steps=_num(steps), guidance=_num(guidance, float),
            seed=-1 if seed is None else _num(seed), batch_count=1 if batch_count is None else _num(batch_count),
            batch_size=1 if batch_size is None else _num(batch_size),
            max_sequence_length=256 if max_sequence_length is None else _num(max_sequence_length),
            shift=_num(shift, float), variant=ctx.variant_for_request(), loras=parse_selection(loras),
        )
        return _result(jobs.run(req, request, progress))

    def load_lora(name=None, file=None):
        """Make a LoRA available: copy an uploaded file into the loras folder (format checked), and
        load it into the current model (if one is loaded) so a mismatch shows now, not at Generate."""
        from ..lora import LoraError
        from .jobs import call, error

        lib = studio.models.loras
        try:
            if file:
                if studio.shared:
                    raise error("Uploading LoRAs is off on shared deployments.", "Not available")
                info = lib.import_file(file, name=(name or "").strip() or None)
            elif name and str(name).strip():
                info = lib.info(str(name).strip())
            else:
                raise error("Give the name of a LoRA in the loras folder, or upload a .safetensors file.")
        except LoraError as e:
            raise error(e, "Could not load the LoRA") from None
        loaded = False
        manager = studio.models
        if manager.current is not None:
            with manager.lock:
                call(manager.activate_loras, manager.current, [(info, 1.0)])
                manager.activate_loras(manager.current, [])  # loaded, but off until a request selects it
            loaded = True
        return {"name": info.name, "sha256": info.sha256, "size": info.size,
                "text_encoders": info.text_encoders, "loaded": loaded}

    def list_loras():
        return {"loras": studio.models.loras.describe(),
                "active": studio.models.active_loras() if "models" in studio.__dict__ else []}

    def gallery_mask(image_id, request: gr.Request = None):
        from .jobs import error

        tab_gallery.get_image(studio, request, image_id)  # raises when not visible to this session
        path = studio.engine.masks.for_image(studio.gallery, image_id, owner=studio.owner_for(request))
        if path is None:
            raise error(f"Image {image_id} has no inpaint mask.", "No mask")
        return str(path)

    def turbo(prompt, width=None, height=None, steps=None, seed=None, batch_count=None, batch_size=None,
              request: gr.Request = None, progress=gr.Progress()):
        req = GenerationRequest(
            prompt=prompt or "", mode="turbo", width=_num(width), height=_num(height), steps=_num(steps),
            seed=-1 if seed is None else _num(seed), batch_count=1 if batch_count is None else _num(batch_count),
            batch_size=1 if batch_size is None else _num(batch_size),
        )
        return _result(jobs.run(req, request, progress))

    def load(variant=None, source=None, preset=None, progress=gr.Progress()):
        status = load_model(studio, variant, source, preset, progress)
        if variant:
            ctx.main_variant = variant
        return status

    def gallery_list(query=None, variant=None, mode=None, starred_only=None, page=None, page_size=None,
                     request: gr.Request = None):
        p = tab_gallery.list_images(studio, request, query, variant, mode, bool(starred_only),
                                    _num(page) or 0, _num(page_size) or tab_gallery.PAGE_SIZE)
        return {"total": p.total, "page": p.page, "pages": p.pages,
                "items": [tab_gallery.item_summary(i) for i in p.items]}

    def gallery_get(image_id, request: gr.Request = None):
        from ..pnginfo import to_infotext

        item = tab_gallery.get_image(studio, request, image_id)
        meta = dict(item.metadata or {})
        return str(item.path), {"id": item.id, "starred": bool(item.starred), "created_at": item.created_at,
                                "metadata": meta}, to_infotext(meta)

    def gallery_star(image_id, starred=True, request: gr.Request = None):
        return {"id": image_id, "starred": tab_gallery.star_image(studio, request, image_id, bool(starred))}

    def gallery_delete(image_id, request: gr.Request = None):
        tab_gallery.delete_image(studio, request, image_id)
        return {"id": image_id, "deleted": True}

    def read_png_info(file=None):
        info = tab_gallery.read_info(file)
        return info.fields, info.infotext, info.source, info.error or ""

    with gr.Column(visible=False, elem_id="api-endpoints"):
        prompt = gr.Textbox(label="prompt")
        negative = gr.Textbox(label="negative_prompt")
        width = gr.Number(None, label="width", precision=0)
        height = gr.Number(None, label="height", precision=0)
        steps = gr.Number(None, label="steps", precision=0)
        guidance = gr.Number(None, label="guidance")
        seed = gr.Number(-1, label="seed", precision=0)
        batch_count = gr.Number(1, label="batch_count", precision=0)
        batch_size = gr.Number(1, label="batch_size", precision=0)
        slg = gr.Dropdown(SLG_CHOICES, value="auto", label="slg")
        msl = gr.Number(256, label="max_sequence_length", precision=0)
        shift = gr.Number(None, label="shift")
        # a File, not an Image: gr.Image decodes uploads itself; the engine refuses bombs before decoding
        init_image = gr.File(None, type="filepath", file_types=["image"], label="init_image")
        strength = gr.Number(0.6, label="strength")
        loras = gr.Textbox("", label="loras")
        inpaint_image = gr.File(None, type="filepath", file_types=["image"], label="image")
        mask = gr.File(None, type="filepath", file_types=["image"], label="mask")
        inpaint_strength = gr.Number(0.85, label="strength")
        mask_blur = gr.Number(4, label="mask_blur", precision=0)
        only_masked = gr.Checkbox(False, label="only_masked")
        padding = gr.Number(32, label="padding", precision=0)
        lora_name = gr.Textbox("", label="name")
        lora_file = gr.File(None, type="filepath", file_types=[".safetensors"], label="file")
        lora_info = gr.JSON(label="lora")
        lora_list = gr.JSON(label="loras")
        mask_png = gr.File(label="mask")
        images = gr.File(file_count="multiple", label="images")
        seed_used = gr.Number(label="seed_used", precision=0)
        info = gr.Textbox(label="info")

        variant = gr.Dropdown([""] + list(VARIANTS), value="", label="variant")
        source = gr.Textbox(label="source")
        preset = gr.Textbox("auto", label="preset")
        status = gr.Textbox(label="status")

        query = gr.Textbox(label="query")
        mode = gr.Dropdown(["", "txt2img", "img2img", "turbo"], value="", label="mode")
        starred_only = gr.Checkbox(False, label="starred_only")
        page = gr.Number(0, label="page", precision=0)
        page_size = gr.Number(tab_gallery.PAGE_SIZE, label="page_size", precision=0)
        listing = gr.JSON(label="listing")
        image_id = gr.Textbox(label="image_id")
        starred = gr.Checkbox(True, label="starred")
        png = gr.File(label="png")
        details = gr.JSON(label="details")
        infotext = gr.Textbox(label="infotext")
        result = gr.JSON(label="result")
        file = gr.File(label="file", type="filepath")
        fields = gr.JSON(label="fields")
        png_source = gr.Textbox(label="source")
        error = gr.Textbox(label="error")

        b = {name: gr.Button(visible=False) for name in (
            "txt2img", "img2img", "turbo", "load_model", "gallery_list", "gallery_get", "gallery_star",
            "gallery_delete", "read_png_info", "inpaint", "load_lora", "list_loras", "gallery_mask")}

    gen_out = [images, seed_used, info]
    gpu_event(b["txt2img"].click, txt2img,
              [prompt, negative, width, height, steps, guidance, seed, batch_count, batch_size, slg, msl, shift,
               loras], gen_out, api_name="txt2img")
    gpu_event(b["img2img"].click, img2img,
              [init_image, prompt, negative, strength, width, height, steps, guidance, seed, batch_count,
               batch_size, msl, shift, loras], gen_out, api_name="img2img")
    gpu_event(b["inpaint"].click, inpaint,
              [inpaint_image, mask, prompt, negative, inpaint_strength, mask_blur, only_masked, padding, steps,
               guidance, seed, batch_count, batch_size, msl, shift, loras], gen_out, api_name="inpaint")
    gpu_event(b["load_lora"].click, load_lora, [lora_name, lora_file], lora_info, api_name="load_lora")
    gpu_event(b["turbo"].click, turbo, [prompt, width, height, steps, seed, batch_count, batch_size], gen_out,
              api_name="turbo")
    gpu_event(b["load_model"].click, load, [variant, source, preset], status, api_name="load_model")
    kw = dict(concurrency_limit=None)
    b["gallery_list"].click(gallery_list, [query, variant, mode, starred_only, page, page_size], listing,
                            api_name="gallery_list", **kw)
    b["gallery_get"].click(gallery_get, image_id, [png, details, infotext], api_name="gallery_get", **kw)
    b["gallery_star"].click(gallery_star, [image_id, starred], result, api_name="gallery_star", **kw)
    b["gallery_delete"].click(gallery_delete, image_id, result, api_name="gallery_delete", **kw)
    b["read_png_info"].click(read_png_info, file, [fields, infotext, png_source, error], api_name="read_png_info",
                             **kw)
    b["list_loras"].click(list_loras, None, lora_list, api_name="list_loras", **kw)
    b["gallery_mask"].click(gallery_mask, image_id, mask_png, api_name="gallery_mask", **kw)
