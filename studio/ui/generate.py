"""What the three generating tabs share: the streaming handler, reuse of parameters, and the
updates that follow a model change. The tabs themselves only lay out control groups."""

from __future__ import annotations

import gradio as gr

from studio.catalog import DEFAULT_VARIANT, TURBO_VARIANT, VARIANTS
from studio.engine.limits import LIMITS
from studio.engine.request import build_request
from studio.metadata.loras import selection_from_fields

from .controls import AUTOMATIC, ResultPanel, SeedRow, progress_html
from .jobs import as_gr_error, call, error, gpu_event, notify, user_errors


def slg_offered(variant) -> bool:
    """Whether Skip Layer Guidance is offered for a variant (the Medium ones)."""
    return "medium" in variant.name


class GenTab:
    """Base for txt2img / img2img / turbo. Subclasses build the layout and ``request``."""

    mode = "txt2img"
    tab_id = "txt2img"
    offers_slg = False  # whether the tab has Skip Layer Guidance (txt2img; ControlNet pipelines have none)

    def __init__(self, ctx):
        self.ctx = ctx
        self.prompt_row = None
        self.seed_row: SeedRow | None = None
        self.result: ResultPanel | None = None
        self.size = None
        self.sampling = None
        self.batch = None
        self.advanced = None
        self.hires = None  # a HiresGroup (txt2img, Turbo, Control)
        self.loras = None  # a LoraGroup of its own (Turbo); the others have one under Advanced

    # -- filled in by subclasses --

    def inputs(self) -> list:
        """The components whose values make the request (the subclass lists them)."""
        raise NotImplementedError

    def fields(self, v: dict) -> dict:
        """The request's fields from the tab's values (``build_request`` fills the rest)."""
        f = {"prompt": v[self.prompt_row.prompt], "seed": v[self.seed_row.seed]}
        if self.prompt_row.negative.visible:
            f["negative_prompt"] = v[self.prompt_row.negative]
        if self.size is not None:
            f["width"], f["height"] = self.size.size(v[self.size.aspect], v[self.size.width], v[self.size.height])
        if self.sampling is not None:
            f["steps"] = v[self.sampling.steps]
            if self.sampling.guidance.visible:
                f["guidance"] = v[self.sampling.guidance]
        if self.batch is not None:
            f["batch_count"], f["batch_size"] = v[self.batch.batch_count], v[self.batch.batch_size]
        if self.advanced is not None:
            f["shift"], f["max_sequence_length"] = v[self.advanced.shift], v[self.advanced.max_sequence_length]
        if self.lora_group() is not None:
            f["loras"] = self.lora_group().selection(v)
        if self.mode != "turbo":
            f["variant"] = self.ctx.variant_for_request()
        f.update(self.prompt_fields(v))
        if self.hires is not None:
            f.update(self.hires.fields(v))
        return f

    def prompt_fields(self, v: dict) -> dict:
        """Sampler, schedule, styles and the prompt controls under Advanced (#16), for the
        components present in ``v`` (the engine's defaults fill the rest)."""
        f = {}
        if self.prompt_row.styles in v:
            f["styles"] = list(v[self.prompt_row.styles] or [])
        if self.sampling is not None:
            if self.sampling.sampler in v:
                f["sampler"] = v[self.sampling.sampler]
            if self.sampling.schedule in v:
                schedule = v[self.sampling.schedule]
                f["schedule"] = None if schedule in (None, "", AUTOMATIC) else schedule
        adv = self.advanced
        if adv is not None and hasattr(adv, "prompt_3"):
            if adv.prompt_3 in v:
                f["prompt_3"] = v[adv.prompt_3] or ""
            if adv.prompt_weighting in v:
                f["prompt_weighting"] = bool(v[adv.prompt_weighting])
            if adv.speed in v:
                f["speed"] = v[adv.speed]
            if self.prompt_row.negative.visible and adv.negative_prompt_3 in v:
                f["negative_prompt_3"] = v[adv.negative_prompt_3] or ""
        return f

    def extra_inputs(self) -> list:
        """The shared groups' inputs beyond the subclass's list (sampler, styles, prompt controls, hires)."""
        out = [self.prompt_row.styles]
        if self.sampling is not None:
            out += [self.sampling.sampler, self.sampling.schedule]
        if self.advanced is not None and hasattr(self.advanced, "prompt_3"):
            out += [self.advanced.prompt_3, self.advanced.negative_prompt_3, self.advanced.prompt_weighting,
                    self.advanced.speed]
        if self.hires is not None:
            out += self.hires.components()
        return out

    def request(self, values: dict):
        """The GenerationRequest for the tab's values (the one builder: ``build_request``)."""
        return build_request(self.fields(values), self.mode)

    def field_components(self) -> dict:
        """studio field name -> component (the reuse-parameters registry for this tab)."""
        d = {"prompt": self.prompt_row.prompt, "seed": self.seed_row.seed}
        if self.prompt_row.negative.visible:
            d["negative_prompt"] = self.prompt_row.negative
        if self.sampling is not None:
            d["steps"] = self.sampling.steps
            if self.sampling.guidance.visible:
                d["guidance"] = self.sampling.guidance
        if self.batch is not None:
            d["batch_size"] = self.batch.batch_size
            d["batch_count"] = self.batch.batch_count
        if self.advanced is not None:
            d["shift"] = self.advanced.shift
            d["max_sequence_length"] = self.advanced.max_sequence_length
            if hasattr(self.advanced, "prompt_3"):
                d.update(prompt_3=self.advanced.prompt_3, prompt_weighting=self.advanced.prompt_weighting,
                         speed=self.advanced.speed)
                if self.prompt_row.negative.visible:
                    d["negative_prompt_3"] = self.advanced.negative_prompt_3
        if self.sampling is not None:
            d.update(sampler=self.sampling.sampler, schedule=self.sampling.schedule)
        d["styles"] = self.prompt_row.styles
        if self.hires is not None:
            d.update(self.hires.field_components())
        return d

    # -- wiring --

    def outputs(self) -> list:
        """What the Generate handler updates."""
        r = self.result
        out = [r.progress, r.preview, r.gallery, r.info, r.paths, r.texts, self.seed_row.last_seed,
               self.ctx.extra["header"]]
        return out + ([self.size.aspect] if self.size is not None else [])

    def lora_group(self):
        """The tab's LoRA panel (its own, or the one under Advanced), or None."""
        return self.loras if self.loras is not None else getattr(self.advanced, "loras", None)

    def image_checks(self) -> list:
        """[(component, field)] of the tab's image inputs, checked the moment a file arrives."""
        return []

    def wire(self) -> None:
        """Register the tab's events: Generate (under the GPU lock), Cancel, the upload checks, the LoRA panel."""
        r = self.result
        inputs = set(self.inputs()) | set(self.extra_inputs()) | {r.paths}
        self._wire_prompt_helpers()
        if self.lora_group() is not None:
            inputs |= set(self.lora_group().components())
            self._wire_loras(self.lora_group())
        for trigger in (self.prompt_row.generate.click, self.prompt_row.prompt.submit):
            gpu_event(trigger, self.stream, inputs, self.outputs(), api_visibility="private",
                      show_progress="full", show_progress_on=[r.preview])
        # queued (its toast needs the queue) but never limited: it must not wait for the GPU lock
        self.prompt_row.cancel.click(self._cancel, None, None, concurrency_limit=None, show_progress="hidden",
                                     api_visibility="private")
        for component, field in self.image_checks():
            component.upload(self._check_upload(field), component, None, concurrency_limit=None,
                             show_progress="hidden", api_visibility="private")

    def _wire_prompt_helpers(self) -> None:
        """The live token counter under the prompt, the styles list (re-read on focus: the user may
        edit styles.csv) and the hires upscalers (re-listed when the accordion opens)."""
        studio = self.ctx.studio
        private = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")
        row, adv = self.prompt_row, self.advanced
        sources = [row.prompt]
        if adv is not None:
            sources += [adv.max_sequence_length] + ([adv.prompt_3, adv.prompt_weighting]
                                                    if hasattr(adv, "prompt_3") else [])

        def count(prompt, msl=256, prompt_3="", weighting=True):
            try:
                text = studio.count_tokens(prompt, msl, prompt_3 or None, weighting)
            except user_errors():
                return ""  # an out-of-range slider value: Generate says what is wrong
            return f"Tokens: {text}" if text else ""

        for comp in sources:
            comp.change(count, sources, row.tokens, trigger_mode="always_last", **private)
        row.styles.focus(lambda: gr.update(choices=call(studio.style_names)), None, row.styles, **private)
        if self.hires is not None:
            self.hires.accordion.expand(lambda: gr.update(choices=call(studio.hires_upscaler_choices)), None,
                                        self.hires.upscaler, **private)

    def _check_upload(self, field: str):
        """An upload handler: the engine's header check now, so a file that is not an image (a
        text file renamed .png) is refused on arrival with the message Generate would give."""
        studio = self.ctx.studio

        def check(value):
            if isinstance(value, dict):  # the editor: its background is the uploaded file
                value = value.get("background")
            if value:
                call(studio.check_image, value, field)

        return check

    def _wire_loras(self, g) -> None:
        """The LoRA picker: choices from the loras folder (on opening and Refresh), upload into the
        folder, unload from the model."""
        studio = self.ctx.studio
        names = [n for n, _ in g.slots]
        private = dict(api_visibility="private")

        g.where = self.ctx.lora_where()

        def refresh():
            choices = call(studio.lora_names)
            return [gr.update(choices=choices) for _ in names] + [g.hint(choices)]

        g.accordion.expand(refresh, None, [*names, g.status], concurrency_limit=None, **private)
        g.refresh.click(refresh, None, [*names, g.status], concurrency_limit=None, **private)

        def upload(file, *current):
            path = getattr(file, "name", file)
            try:
                info = studio.import_lora(path, name=_upload_stem(path))
            except (*user_errors(), OSError) as e:
                raise error(e, "Could not add the LoRA") from None
            choices = call(studio.lora_names)
            values = list(current)
            if info.name not in values:
                empty = next((i for i, v in enumerate(values) if not v), None)
                if empty is not None:
                    values[empty] = info.name
            gr.Info(f"LoRA {info.name} added.")
            return [gr.update(choices=choices, value=v) for v in values] + [
                f"Added **{info.name}** (sha256 {info.sha256[:12]}…)."]

        g.upload.upload(upload, [g.upload, *names], [*names, g.status], concurrency_limit=None, **private)

        def unload():
            n = call(studio.unload_loras)
            return f"Unloaded {n} LoRA adapter(s) from memory; the model is back to its base weights."

        gpu_event(g.unload.click, unload, None, g.status, **private)

    def _cancel(self, request: gr.Request):
        n = self.ctx.jobs.cancel(request)
        if n:
            gr.Info("Cancelling: stopping after the current step; finished images are kept.")
        else:
            gr.Info("Nothing is running.")

    def loading_label(self, req) -> str | None:
        """The model this request will load first (None when the loaded one serves it)."""
        studio = self.ctx.studio
        name = (req.variant or TURBO_VARIANT) if req.mode == "turbo" else req.variant
        current = studio.current
        if current is not None and (name is None or current.variant.name == name):
            return None
        variant = VARIANTS.get(name or studio.config.variant or DEFAULT_VARIANT)
        return (variant.label if variant else "the model") + (" (tiny demo)" if studio.config.demo else "")

    def stream(self, values: dict, request: gr.Request, progress=gr.Progress()):
        """The Generate button: progress bar, live previews, images as they finish. A refusal or
        a failure is said twice: a toast, and the Info box (earlier results stay on screen)."""
        from .context import status_html

        r = self.result
        header = self.ctx.extra["header"]
        earlier = bool(values.get(r.paths))
        try:
            req = call(self.request, values)  # a bad upload is refused here, with the engine's message
        except gr.Error as e:
            yield {r.info: failed_text(e, earlier)}
            raise
        loading = self.loading_label(req)
        paths: list[str] = []
        yield {r.progress: progress_html(0, req.steps or 0, 0, max(1, int(req.batch_count or 1)), None, 0),
               r.preview: gr.update(visible=True, value=None), r.info: "",
               header: status_html(self.ctx.studio, loading=loading)}
        try:
            for u in self.ctx.jobs.stream(req, request, progress):
                if u.kind == "progress":
                    ev = u.event
                    out = {r.progress: progress_html(ev.step, ev.steps, ev.run, ev.runs, ev.eta_s, ev.fraction)}
                    if u.preview is not None:
                        out[r.preview] = u.preview
                    if loading:  # the model is loaded once the first step is done
                        loading = None
                        out[header] = status_html(self.ctx.studio)
                    yield out
                elif u.kind == "image":
                    if u.image.path:
                        paths.append(u.image.path)
                        yield {r.gallery: r.show(paths), header: status_html(self.ctx.studio)}
                elif u.kind == "done":
                    res = u.result
                    notify(res.notes)
                    if res.cancelled:
                        gr.Info(f"Cancelled: kept {len(res.images)} finished image(s).")
                    if res.images:
                        self.ctx.remember(res.images[0].metadata.get("variant"))
                    done = [i for i in res.images if i.path]
                    paths = [i.path for i in done]
                    out = {
                        r.progress: "",
                        r.preview: gr.update(visible=False, value=None),
                        r.gallery: r.show(paths) if paths else gr.update(),
                        r.info: res.info,
                        r.paths: paths if paths else values.get(r.paths) or [],
                        r.texts: [(i.metadata.get("prompt", ""), i.metadata.get("negative_prompt", ""))
                                  for i in done] if paths else gr.update(),
                        self.seed_row.last_seed: res.seed if res.images else gr.update(),
                        header: status_html(self.ctx.studio),
                    }
                    if self.size is not None:  # the model may have changed: presets that fit it
                        out[self.size.aspect] = self.size.refresh()
                    yield out
        except (gr.Error, *user_errors()) as e:  # the engine's refusals, a failed load or save
            ge = e if isinstance(e, gr.Error) else as_gr_error(e)
            yield {r.progress: "", r.preview: gr.update(visible=False, value=None),
                   r.info: failed_text(ge, earlier, len(paths)), header: status_html(self.ctx.studio)}
            raise ge from None

    # -- reuse parameters / model changes --

    def apply_fields(self, fields: dict, inputs: dict | None = None) -> dict:
        """Updates filling this tab from cleaned studio fields (gallery metadata or read PNG info)
        and the image's stored inputs (``init_image`` / ``mask_image`` paths, owner-checked)."""
        out = {}
        comps = self.field_components()
        for name, comp in comps.items():
            value = fields.get(name)
            if value is None:
                continue
            if name in LIMITS:
                try:
                    out[comp] = int(value) if LIMITS[name].integer else float(value)
                except (TypeError, ValueError):
                    continue
            elif name == "styles":
                out[comp] = [str(x) for x in value] if isinstance(value, list) else []
            elif name == "prompt_weighting":
                out[comp] = bool(value)
            else:
                out[comp] = str(value)
        if self.hires is not None:  # an image made with hires fix turns it on again
            out[self.hires.enabled] = isinstance(fields.get("hires_scale"), (int, float)) and fields["hires_scale"] > 1
        w, h = fields.get("width"), fields.get("height")
        if self.size is not None and w and h:
            try:
                aspect, width, height, row = self.size.updates_for(int(w), int(h))
                out.update({self.size.aspect: aspect, self.size.width: width, self.size.height: height,
                            self.size.custom_row: row})
            except (TypeError, ValueError):
                pass
        if self.advanced is not None and self.offers_slg and "slg" in fields:
            out[self.advanced.slg] = isinstance(fields.get("slg"), dict)  # null: it was off
        if self.lora_group() is not None:  # JSON "loras", or <lora:name:weight> tags out of the prompt
            prompt, selection = selection_from_fields(fields)
            if fields.get("prompt") is not None:
                out[self.prompt_row.prompt] = prompt
            out.update(self.lora_group().updates_for(selection, call(self.ctx.studio.lora_names)))
        return out

    def reuse_targets(self) -> list:
        """Every component reuse parameters may update in this tab."""
        comps = list(self.field_components().values())
        if self.hires is not None:
            comps.append(self.hires.enabled)
        if self.size is not None:
            comps += [self.size.aspect, self.size.width, self.size.height, self.size.custom_row]
        if self.advanced is not None:
            comps.append(self.advanced.slg)
        if self.lora_group() is not None:
            comps += self.lora_group().components()
        return comps

    def variant_updates(self, variant_name: str | None) -> dict:
        """Recommended steps/guidance and the SLG offer for a newly chosen variant."""
        variant = VARIANTS.get(variant_name or "")
        if variant is None or self.sampling is None:
            return {}
        out = {self.sampling.steps: variant.steps, self.sampling.guidance: variant.guidance}
        if self.advanced is not None and self.offers_slg:
            out[self.advanced.slg] = gr.update(visible=slg_offered(variant), value=variant.slg.recommended)
        return out

    def variant_targets(self) -> list:
        """The components a model change updates (recommended steps, guidance, SLG)."""
        if self.sampling is None:
            return []
        t = [self.sampling.steps, self.sampling.guidance]
        if self.advanced is not None and self.offers_slg:
            t.append(self.advanced.slg)
        return t


def failed_text(e: gr.Error, earlier: bool = False, finished: int = 0) -> str:
    """The Info box after a refusal or a failure: what went wrong, and that nothing was lost."""
    import html

    text = f"Not generated: {html.unescape(str(getattr(e, 'message', e)))}"
    if finished:
        text += f"\n{finished} image(s) finished before it stopped: they are shown and in the gallery."
    elif earlier:
        text += "\nThe images shown are from the previous run (they are in the gallery)."
    return text


def _upload_stem(path) -> str:
    """The LoRA name of an upload: Gradio keeps the original file name as the last path part."""
    from pathlib import Path

    return Path(str(path)).stem
