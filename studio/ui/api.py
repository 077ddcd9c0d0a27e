"""The named API endpoints, for gradio_client and scripts: plain inputs, blocking calls.

They are wired to hidden components (never shown in the page), so their parameter names are
clean and independent of the UI layout, and their defaults come from the limits table. Number
inputs are passed to the engine exactly as sent (:class:`RawNumber`): ``steps=1.5``,
``width="abc"`` or ``seed=[1]`` come back as an error naming the field, never silently rounded.
Every endpoint's docstring is its description in ``client.view_api()``.
"""

from __future__ import annotations

import gradio as gr

from studio.catalog import VARIANTS
from studio.control_catalog import CONTROL_TYPES, CONTROLNETS, PREPROCESSORS
from studio.engine.limits import LIMITS, MODES
from studio.engine.request import build_request
from studio.engine.samplers import DEFAULT_SAMPLER, SAMPLERS, SCHEDULES
from studio.engine.stepcache import SPEED_DEFAULT, SPEED_MODES, SPEED_THRESHOLDS
from studio.engine.weighting import EMPHASIS
from studio.service import PAGE_SIZE
from studio.ui.components import RawNumber
from studio.ui.jobs import as_gr_error, call, error, gpu_event, user_errors

SLG_CHOICES = ["auto", "on", "off"]


def _num(label: str, mode: str | None = None, value=None):
    lim = LIMITS.get(label)
    if value is None and lim is not None:
        value = lim.default_for(mode)
    return RawNumber(value, label=label, info=lim.help if lim else None)


def _result(res):
    return [i.path for i in res.images if i.path], res.seed, res.info


def _generate(ctx, mode: str, fields: dict, request, progress):
    req = call(build_request, {**fields, "variant": ctx.variant_for_request() if mode != "turbo" else None}, mode)
    res = ctx.jobs.run(req, request, progress)
    if res.images and mode != "turbo":
        ctx.remember(res.images[0].metadata.get("variant"))
    return _result(res)


def _sampling(sampler, schedule, prompt_3, negative_prompt_3, styles, prompt_weighting, emphasis) -> dict:
    """The sampling and prompt-control parameters every generation endpoint takes (#16)."""
    return dict(sampler=sampler, schedule=schedule, prompt_3=prompt_3, negative_prompt_3=negative_prompt_3,
                styles=styles, prompt_weighting=prompt_weighting, emphasis=emphasis)


def _sampling_inputs(studio, negative=True) -> list:
    """The components of :func:`_sampling` (the engine checks every value and names the choices)."""
    parts = [gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, allow_custom_value=True, label="sampler",
                         info="Forge's names: Euler, DPM++ 2M, …"),
             gr.Dropdown(["", "Automatic", *SCHEDULES], value="", allow_custom_value=True, label="schedule",
                         info="'' or Automatic: the sampler's default (Euler: Normal)"),
             gr.Textbox("", label="prompt_3", info="what T5 reads instead of the prompt ('': the prompt)")]
    if negative:
        parts.append(gr.Textbox("", label="negative_prompt_3"))
    parts += [gr.Dropdown(studio.style_names(), value=[], multiselect=True, allow_custom_value=True, label="styles",
                          info="styles.csv names, applied in order"),
              gr.Checkbox(True, label="prompt_weighting", info="A1111 (word:1.2) syntax and 75-token CLIP chunks"),
              gr.Dropdown(list(EMPHASIS), value="Original", allow_custom_value=True, label="emphasis")]
    return parts


def _speed_input():
    """The ``speed`` parameter every generation endpoint takes last (#19; the engine checks it)."""
    return gr.Dropdown(list(SPEED_MODES), value=SPEED_DEFAULT, allow_custom_value=True, label="speed",
                       info="step caching: off (exact, the default), fast or faster (First Block Cache, threshold "
                            + " / ".join(f"{t:g}" for t in SPEED_THRESHOLDS.values()) + ")")


def _hires(hires_scale, hires_steps, hires_denoise, hires_upscaler, hires_variant) -> dict:
    """The hires-fix parameters of /txt2img and /turbo (#17)."""
    return dict(hires_scale=hires_scale, hires_steps=hires_steps, hires_denoise=hires_denoise,
                hires_upscaler=hires_upscaler, hires_variant=hires_variant)


def _hires_inputs(studio, mode: str) -> list:
    return [_num("hires_scale", mode), _num("hires_steps", mode), _num("hires_denoise", mode),
            gr.Dropdown(["", *studio.hires_upscaler_choices()], value="", allow_custom_value=True,
                        label="hires_upscaler", info="'': Lanczos; latent-bislerp / latent-nearest-exact; a file's name"),
            gr.Dropdown([""] + list(VARIANTS), value="", label="hires_variant",
                        info="another variant for the second pass ('': the same model)")]


def _generation_endpoints(ctx, out):
    """/txt2img, /img2img, /inpaint, /turbo."""

    def txt2img(prompt, negative_prompt=None, width=None, height=None, steps=None, guidance=None, seed=None, batch_count=None, batch_size=None, slg=None,
                max_sequence_length=None, shift=None, loras=None, sampler=None, schedule=None, prompt_3=None,
                negative_prompt_3=None, styles=None, prompt_weighting=None, emphasis=None, hires_scale=None,
                hires_steps=None, hires_denoise=None, hires_upscaler=None, hires_variant=None, speed=None,
                request: gr.Request = None, progress=gr.Progress()):
        """Text to image. Returns (the saved PNG files, the first seed used, the info text).

        width/height None: the model's native size (snapped to 16, and said so); steps/guidance
        None: the variant's recommendation; seed -1: random; loras: "name:0.8, other" or <lora:name:0.8>;
        sampler/schedule: Forge's names (schedule '' = the sampler's default); styles: styles.csv names;
        hires_scale above 1: hires fix (upscale with hires_upscaler, then a second pass of hires_steps at
        hires_denoise, on hires_variant if given); speed: off (exact), fast or faster (step caching)."""
        return _generate(ctx, "txt2img", dict(
            prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
            guidance=guidance, seed=seed, batch_count=batch_count, batch_size=batch_size, slg=slg,
            max_sequence_length=max_sequence_length, shift=shift, loras=loras,
            **_sampling(sampler, schedule, prompt_3, negative_prompt_3, styles, prompt_weighting, emphasis),
            **_hires(hires_scale, hires_steps, hires_denoise, hires_upscaler, hires_variant), speed=speed),
            request, progress)

    def img2img(init_image=None, prompt=None, negative_prompt=None, strength=None, width=None, height=None, steps=None, guidance=None, seed=None, batch_count=None,
                batch_size=None, max_sequence_length=None, shift=None, loras=None, sampler=None, schedule=None,
                prompt_3=None, negative_prompt_3=None, styles=None, prompt_weighting=None, emphasis=None,
                speed=None, request: gr.Request = None, progress=gr.Progress()):
        """Image to image: repaint an init image by strength. Returns (PNG files, seed, info).

        width/height None: the init image's size, brought within the model's limits."""
        return _generate(ctx, "img2img", dict(
            init_image=init_image, prompt=prompt, negative_prompt=negative_prompt, strength=strength, width=width,
            height=height, steps=steps, guidance=guidance, seed=seed, batch_count=batch_count,
            batch_size=batch_size, max_sequence_length=max_sequence_length, shift=shift, loras=loras,
            **_sampling(sampler, schedule, prompt_3, negative_prompt_3, styles, prompt_weighting, emphasis),
            speed=speed), request, progress)

    def inpaint(image=None, mask=None, prompt=None, negative_prompt=None, strength=None, mask_blur=None, only_masked=None, padding=None, steps=None, guidance=None,
                seed=None, batch_count=None, batch_size=None, max_sequence_length=None, shift=None, loras=None,
                sampler=None, schedule=None, prompt_3=None, negative_prompt_3=None, styles=None,
                prompt_weighting=None, emphasis=None, speed=None, request: gr.Request = None,
                progress=gr.Progress()):
        """Inpaint: repaint an image where its mask is white (or opaque, for a PNG with alpha).

        Returns (PNG files, seed, info); pixels away from the mask stay the source's."""
        return _generate(ctx, "inpaint", dict(
            init_image=image, mask_image=mask, prompt=prompt, negative_prompt=negative_prompt, strength=strength,
            mask_blur=mask_blur, only_masked=only_masked, padding=padding, steps=steps, guidance=guidance,
            seed=seed, batch_count=batch_count, batch_size=batch_size, max_sequence_length=max_sequence_length,
            shift=shift, loras=loras,
            **_sampling(sampler, schedule, prompt_3, negative_prompt_3, styles, prompt_weighting, emphasis),
            speed=speed), request, progress)

    def turbo(prompt, width=None, height=None, steps=None, seed=None, batch_count=None, batch_size=None,
              sampler=None, schedule=None, prompt_3=None, styles=None, prompt_weighting=None, emphasis=None,
              hires_scale=None, hires_steps=None, hires_denoise=None, hires_upscaler=None, hires_variant=None,
              speed=None, request: gr.Request = None, progress=gr.Progress()):
        """SD3.5 Large Turbo: 4 steps, no CFG (no negative prompt). Returns (PNG files, seed, info)."""
        return _generate(ctx, "turbo", dict(
            prompt=prompt, width=width, height=height, steps=steps, seed=seed, batch_count=batch_count,
            batch_size=batch_size, **_sampling(sampler, schedule, prompt_3, None, styles, prompt_weighting, emphasis),
            **_hires(hires_scale, hires_steps, hires_denoise, hires_upscaler, hires_variant), speed=speed),
            request, progress)

    def controlnet(prompt, negative_prompt=None, width=None, height=None, steps=None, guidance=None, seed=None,
                   batch_count=None, batch_size=None, slg=None, max_sequence_length=None, shift=None, loras=None,
                   sampler=None, schedule=None, prompt_3=None, negative_prompt_3=None, styles=None,
                   prompt_weighting=None, emphasis=None, hires_scale=None, hires_steps=None, hires_denoise=None,
                   hires_upscaler=None, hires_variant=None, control_image=None, control_type=None, controlnet=None,
                   control_scale=None, control_start=None, control_end=None, preprocess=None, canny_low=None,
                   canny_high=None, blur_radius=None, image=None, mask=None, speed=None, request: gr.Request = None,
                   progress=gr.Progress()):
        """Text to image steered by a ControlNet: the txt2img inputs plus the control image, its type
        (canny, depth, blur, pose, tile; inpaint with image + mask), the ControlNet (a catalog id; none:
        the catalog's for the model), its scale, start and end, and the preprocessor (canny, depth, blur
        or none for a ready map) with its settings. Returns (PNG files, seed, info)."""
        mode = "inpaint" if control_type == "inpaint" or mask else "txt2img"
        return _generate(ctx, mode, dict(
            prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
            guidance=guidance, seed=seed, batch_count=batch_count, batch_size=batch_size, slg=slg,
            max_sequence_length=max_sequence_length, shift=shift, loras=loras,
            **_sampling(sampler, schedule, prompt_3, negative_prompt_3, styles, prompt_weighting, emphasis),
            **_hires(hires_scale, hires_steps, hires_denoise, hires_upscaler, hires_variant),
            control_image=control_image, control_type=control_type or None, controlnet=controlnet or None,
            control_scale=control_scale, control_start=control_start, control_end=control_end,
            preprocess=preprocess or None, canny_low=canny_low, canny_high=canny_high, blur_radius=blur_radius,
            init_image=image, mask_image=mask, speed=speed), request, progress)

    def common(_mode, negative=True):
        parts = [gr.Textbox(label="prompt")]
        if negative:
            parts.append(gr.Textbox(label="negative_prompt"))
        return parts

    def sizes_steps(mode, guidance=True):
        parts = [_num("width", mode), _num("height", mode), _num("steps", mode)]
        if guidance:
            parts.append(_num("guidance", mode))
        return parts + [_num("seed", mode), _num("batch_count", mode), _num("batch_size", mode)]

    def tail(mode):
        return [_num("max_sequence_length", mode), _num("shift", mode), gr.Textbox("", label="loras")]

    def image(label):
        # a File, not an Image: gr.Image decodes uploads itself; the engine checks the header first
        return gr.File(None, type="filepath", file_types=["image"], label=label)

    studio = ctx.studio
    inputs = {
        "txt2img": [*common("txt2img"), *sizes_steps("txt2img"), gr.Dropdown(SLG_CHOICES, value="auto", label="slg"),
                    *tail("txt2img"), *_sampling_inputs(studio), *_hires_inputs(studio, "txt2img"), _speed_input()],
        "img2img": [image("init_image"), *common("img2img"), _num("strength", "img2img"), *sizes_steps("img2img"),
                    *tail("img2img"), *_sampling_inputs(studio), _speed_input()],
        "inpaint": [image("image"), image("mask"), *common("inpaint"), _num("strength", "inpaint"),
                    _num("mask_blur", "inpaint"), gr.Checkbox(False, label="only_masked"), _num("padding", "inpaint"),
                    _num("steps", "inpaint"), _num("guidance", "inpaint"), _num("seed", "inpaint"),
                    _num("batch_count", "inpaint"), _num("batch_size", "inpaint"), *tail("inpaint"),
                    *_sampling_inputs(studio), _speed_input()],
        "turbo": [*common("turbo", negative=False), *sizes_steps("turbo", guidance=False),
                  *_sampling_inputs(studio, negative=False), *_hires_inputs(studio, "turbo"), _speed_input()],
        "controlnet": [*common("txt2img"), *sizes_steps("txt2img"),
                       gr.Dropdown(SLG_CHOICES, value="auto", label="slg"), *tail("txt2img"),
                       *_sampling_inputs(studio), *_hires_inputs(studio, "txt2img"), image("control_image"),
                       gr.Dropdown(["", *CONTROL_TYPES], value="", allow_custom_value=True, label="control_type",
                                   info="'': the ControlNet's type, else canny"),
                       gr.Dropdown(["", *CONTROLNETS], value="", allow_custom_value=True, label="controlnet",
                                   info="a catalog id ('': the catalog's for the model and type)"),
                       _num("control_scale"), _num("control_start"), _num("control_end"),
                       gr.Dropdown(["", *PREPROCESSORS], value="", allow_custom_value=True, label="preprocess",
                                   info="'': the ControlNet's; none: the control image is the map"),
                       _num("canny_low"), _num("canny_high"), _num("blur_radius"), image("image"), image("mask"),
                       _speed_input()],
    }
    fns = {"txt2img": txt2img, "img2img": img2img, "inpaint": inpaint, "turbo": turbo, "controlnet": controlnet}
    gen_out = [gr.File(file_count="multiple", label="images"), gr.Number(label="seed_used", precision=0),
               gr.Textbox(label="info")]
    for name, fn in fns.items():
        gpu_event(out[name].click, fn, inputs[name], gen_out, api_name=name)


def _model_endpoints(ctx, out):
    """/load_model, /load_lora, /list_loras."""
    studio = ctx.studio

    def load(variant=None, source=None, preset=None, progress=gr.Progress()):
        """Load (or switch to) a variant with a memory preset ("auto": the planner's choice). Returns
        the status line. On a shared deployment only catalog variants load (no source)."""
        from studio.ui.tab_models import load_model

        status = load_model(studio, variant, source, preset, progress)
        if variant:
            ctx.main_variant = variant
        return status

    def load_lora(name=None, file=None):
        """Make a LoRA available: copy an uploaded .safetensors file into the loras folder (format
        checked; not on shared deployments) or name one there, and check it against the loaded
        model. LoRAs are then selected per request (the loras parameter), never for everyone.
        Returns {name, sha256, size, text_encoders, loaded}."""
        if file:
            info = call(studio.import_lora, file, (name or "").strip() or None)
        elif name and str(name).strip():
            info = None
        else:
            raise error("Give the name of a LoRA in the loras folder, or upload a .safetensors file.")
        info, loaded = call(studio.check_lora, info.name if info else str(name).strip())
        return {"name": info.name, "sha256": info.sha256, "size": info.size,
                "text_encoders": info.text_encoders, "loaded": loaded}

    def list_loras():
        """The LoRAs in the loras folder ({loras: [{name, sha256, size, text_encoders, error}], active})."""
        return call(studio.describe_loras)

    gpu_event(out["load_model"].click, load,
              [gr.Dropdown([""] + list(VARIANTS), value="", label="variant"), gr.Textbox(label="source"),
               gr.Textbox("auto", label="preset")], gr.Textbox(label="status"), api_name="load_model")
    gpu_event(out["load_lora"].click, load_lora,
              [gr.Textbox("", label="name"), gr.File(None, type="filepath", file_types=[".safetensors"], label="file")],
              gr.JSON(label="lora"), api_name="load_lora")
    out["list_loras"].click(list_loras, None, gr.JSON(label="loras"), api_name="list_loras", concurrency_limit=None)


def _prompt_endpoints(ctx, out):
    """/token_count, /styles: what the prompt boxes show (no model run, no GPU lock)."""
    studio = ctx.studio

    def token_count(prompt=None, max_sequence_length=None, prompt_3=None, prompt_weighting=True):
        """What the text encoders will read of a prompt: "CLIP 80/150 (2 chunks) · T5 93/256", and
        what each would cut. Counted with the loaded model's tokenizers ("" while none is loaded)."""
        return call(studio.count_tokens, prompt or "", max_sequence_length, prompt_3 or None,
                    True if prompt_weighting is None else bool(prompt_weighting))

    def styles():
        """The prompt styles ([{name, prompt, negative_prompt}]): the project's defaults and the data
        dir's styles.csv (A1111's format) over them. A style's {prompt} is where the prompt goes."""
        return call(studio.describe_styles)

    kw = dict(concurrency_limit=None)
    out["token_count"].click(
        token_count, [gr.Textbox(label="prompt"), _num("max_sequence_length", "txt2img"),
                      gr.Textbox("", label="prompt_3"), gr.Checkbox(True, label="prompt_weighting")],
        gr.Textbox(label="count"), api_name="token_count", **kw)
    out["styles"].click(styles, None, gr.JSON(label="styles"), api_name="styles", **kw)


def _control_endpoints(ctx, out):
    """/control_preview, /list_controlnets."""
    studio = ctx.studio

    def control_preview(control_image=None, control_type=None, controlnet=None, preprocess=None, canny_low=None,
                        canny_high=None, blur_radius=None, width=None, height=None):
        """The control map a ControlNet will read of an image (fitted to the size, preprocessed, in the
        model's polarity), as the generation would compute it. Returns the map as an image."""
        return call(studio.control_preview, control_image, control_type or None, controlnet or None,
                    preprocess or None, canny_low, canny_high, blur_radius, None, None, width, height)

    def list_controlnets(variant=None, control_type=None):
        """The ControlNets that fit a variant ('': the loaded one), optionally of one type:
        [{id, label, control_type, preprocessor, scale, start, end, steps, guidance, notes}]."""
        return call(studio.controlnets_for, variant or None, control_type or None)

    gpu_event(out["control_preview"].click, control_preview,
              [gr.File(None, type="filepath", file_types=["image"], label="control_image"),
               gr.Dropdown(["", *CONTROL_TYPES], value="", allow_custom_value=True, label="control_type"),
               gr.Dropdown(["", *CONTROLNETS], value="", allow_custom_value=True, label="controlnet"),
               gr.Dropdown(["", *PREPROCESSORS], value="", allow_custom_value=True, label="preprocess"),
               _num("canny_low"), _num("canny_high"), _num("blur_radius"), _num("width"), _num("height")],
              gr.Image(type="pil", format="png", label="map"), api_name="control_preview")
    out["list_controlnets"].click(
        list_controlnets, [gr.Dropdown([""] + list(VARIANTS), value="", label="variant"),
                           gr.Dropdown(["", *CONTROL_TYPES], value="", label="control_type")],
        gr.JSON(label="controlnets"), api_name="list_controlnets", concurrency_limit=None)


def _upscale_endpoints(ctx, out):
    """/upscale, /list_upscalers, /load_upscaler."""
    studio = ctx.studio

    def upscale(image=None, image_id=None, upscaler=None, scale=None, refine_prompt=None, refine_denoise=None,
                refine_steps=None, request: gr.Request = None, progress=gr.Progress()):
        """Upscale an upload or one of your gallery images (by id) with an upscaler (Lanczos or a file
        in the upscalers folder) by scale; an optional refine pass (img2img at refine_denoise with
        refine_prompt, default: the image's own prompt) follows when either is given. The result is a
        new gallery image that records its parent's id. Returns (the PNG, {id, parent_image_id, width,
        height, upscaler, scale}, the info text)."""
        def tiles(done, total):
            progress(done / max(total, 1), desc=f"Upscaling: tile {done}/{total}")

        res = call(studio.upscale, image=image or None, image_id=(image_id or "").strip() or None,
                   upscaler=upscaler or None, scale=scale, refine_prompt=refine_prompt or None,
                   refine_denoise=refine_denoise, owner=studio.owner_for(request), progress=tiles,
                   refine_steps=refine_steps)
        try:
            res.wait_saved()
        except user_errors() as e:
            raise as_gr_error(e) from None
        item = res.images[0]
        meta = item.metadata
        return item.path, {"id": item.id, "parent_image_id": meta.get("parent_image_id"), "width": item.image.width,
                           "height": item.image.height, "upscaler": meta.get("upscale_upscaler"),
                           "scale": meta.get("upscale_scale"), "mode": meta.get("mode")}, res.info

    def list_upscalers():
        """The upscalers: {upscalers: [{name, sha256, hash, size, architecture, scale, error}], builtin,
        latent} (the latent ones are for hires fix only)."""
        return call(studio.describe_upscalers)

    def load_upscaler(file=None, name=None):
        """Add an upscaler: copy an uploaded .safetensors (or weights-only .pth) into the upscalers folder
        after spandrel identifies it (pickles refused; not on shared deployments). Returns {name, sha256,
        hash, architecture, scale}."""
        if not file:
            raise error("Upload an upscaler file (.safetensors, or a weights-only .pth).")
        info = call(studio.import_upscaler, file, (name or "").strip() or None)
        return {"name": info.name, "sha256": info.sha256, "hash": info.short_hash,
                "architecture": info.architecture, "scale": info.scale}

    gpu_event(out["upscale"].click, upscale,
              [gr.File(None, type="filepath", file_types=["image"], label="image"), gr.Textbox("", label="image_id"),
               gr.Dropdown(studio.upscaler_names(), value="Lanczos", allow_custom_value=True, label="upscaler"),
               _num("upscale_scale", None), gr.Textbox("", label="refine_prompt"),
               RawNumber(None, label="refine_denoise", info=LIMITS["refine_denoise"].help),
               RawNumber(None, label="refine_steps", info="the refine pass's steps (none: the variant's)")],
              [gr.File(label="png"), gr.JSON(label="details"), gr.Textbox(label="info")], api_name="upscale")
    out["list_upscalers"].click(list_upscalers, None, gr.JSON(label="upscalers"), api_name="list_upscalers",
                                concurrency_limit=None)
    gpu_event(out["load_upscaler"].click, load_upscaler,
              [gr.File(None, type="filepath", file_types=[".safetensors", ".pth", ".pt"], label="file"),
               gr.Textbox("", label="name")], gr.JSON(label="upscaler"), api_name="load_upscaler")


def item_summary(item) -> dict:
    """A gallery row as plain JSON (no paths: files come through /gallery_get)."""
    return {"id": item.id, "created_at": item.created_at, "prompt": item.prompt,
            "negative_prompt": item.negative_prompt, "variant": item.variant, "mode": item.mode,
            "seed": item.seed, "width": item.width, "height": item.height, "starred": bool(item.starred)}


def _gallery_endpoints(ctx, out):
    """/gallery_list, /gallery_get, /gallery_star, /gallery_delete, /gallery_mask, /read_png_info."""
    studio = ctx.studio

    def gallery_list(query=None, variant=None, mode=None, starred_only=None, page=None, page_size=None, request: gr.Request = None):
        """One page of your gallery, newest first: {total, page, pages, items}. query matches words of
        the prompt; variant and mode filter; page counts from 0."""
        p = call(studio.list_images, studio.owner_for(request), query, variant, mode, bool(starred_only),
                 page, page_size)
        return {"total": p.total, "page": p.page, "pages": p.pages, "items": [item_summary(i) for i in p.items]}

    def gallery_get(image_id, request: gr.Request = None):
        """One of your images by id: (the original PNG, {id, starred, created_at, metadata}, infotext)."""
        from studio.metadata import to_infotext

        item = call(studio.get_image, image_id, studio.owner_for(request))
        meta = dict(item.metadata or {})
        return str(item.path), {"id": item.id, "starred": bool(item.starred), "created_at": item.created_at,
                                "metadata": meta}, to_infotext(meta)

    def gallery_star(image_id, starred=True, request: gr.Request = None):
        """Star or unstar one of your images: {id, starred}."""
        return {"id": image_id, "starred": call(studio.star_image, image_id, bool(starred), studio.owner_for(request))}

    def gallery_delete(image_id, request: gr.Request = None):
        """Delete one of your images (and its stored mask / init image when no other image uses them)."""
        call(studio.delete_image, image_id, studio.owner_for(request))
        return {"id": image_id, "deleted": True}

    def gallery_mask(image_id, request: gr.Request = None):
        """The inpaint mask of one of your images (PNG, white = repainted)."""
        return call(studio.mask_path, image_id, studio.owner_for(request))

    def read_png_info(file=None):
        """The generation metadata of any PNG (ours, A1111/Forge/SD.Next, ComfyUI, InvokeAI):
        (fields, infotext, source, error). Fields use studio names; nothing is trusted or opened."""
        info = call(studio.read_png_info, file)
        return info.fields, info.infotext, info.source, info.error or ""

    kw = dict(concurrency_limit=None)
    image_id = gr.Textbox(label="image_id")
    out["gallery_list"].click(
        gallery_list,
        [gr.Textbox(label="query"), gr.Dropdown([""] + list(VARIANTS), value="", label="variant"),
         gr.Dropdown([""] + list(MODES), value="", label="mode"), gr.Checkbox(False, label="starred_only"),
         RawNumber(0, label="page"), RawNumber(PAGE_SIZE, label="page_size")],
        gr.JSON(label="listing"), api_name="gallery_list", **kw)
    out["gallery_get"].click(gallery_get, image_id, [gr.File(label="png"), gr.JSON(label="details"),
                                                     gr.Textbox(label="infotext")], api_name="gallery_get", **kw)
    out["gallery_star"].click(gallery_star, [image_id, gr.Checkbox(True, label="starred")], gr.JSON(label="result"),
                              api_name="gallery_star", **kw)
    out["gallery_delete"].click(gallery_delete, image_id, gr.JSON(label="result"), api_name="gallery_delete", **kw)
    out["gallery_mask"].click(gallery_mask, image_id, gr.File(label="mask"), api_name="gallery_mask", **kw)
    out["read_png_info"].click(
        read_png_info, gr.File(label="file", type="filepath"),
        [gr.JSON(label="fields"), gr.Textbox(label="infotext"), gr.Textbox(label="source"), gr.Textbox(label="error")],
        api_name="read_png_info", **kw)


ENDPOINTS = ("txt2img", "img2img", "turbo", "inpaint", "load_model", "load_lora", "list_loras", "gallery_list",
             "gallery_get", "gallery_star", "gallery_delete", "gallery_mask", "read_png_info", "token_count",
             "styles", "upscale", "list_upscalers", "load_upscaler", "controlnet", "control_preview",
             "list_controlnets")


def register(ctx) -> None:
    """Add the hidden components and the named endpoints to the app being built."""
    with gr.Column(visible=False, elem_id="api-endpoints"):
        triggers = {name: gr.Button(visible=False) for name in ENDPOINTS}
        _generation_endpoints(ctx, triggers)
        _model_endpoints(ctx, triggers)
        _gallery_endpoints(ctx, triggers)
        _prompt_endpoints(ctx, triggers)
        _upscale_endpoints(ctx, triggers)
        _control_endpoints(ctx, triggers)
