"""What the three generating tabs share: the streaming handler, reuse of parameters, and the
updates that follow a model change. The tabs themselves only lay out control groups."""

from __future__ import annotations

import gradio as gr

from ..catalog import VARIANTS
from .controls import ResultPanel, SeedRow, progress_html
from .jobs import gpu_event, notify


def slg_offered(variant) -> bool:
    return "medium" in variant.name


class GenTab:
    """Base for txt2img / img2img / turbo. Subclasses build the layout and ``request``."""

    mode = "txt2img"
    tab_id = "txt2img"

    def __init__(self, ctx):
        self.ctx = ctx
        self.prompt_row = None
        self.seed_row: SeedRow | None = None
        self.result: ResultPanel | None = None
        self.size = None
        self.sampling = None
        self.batch = None
        self.advanced = None

    # -- filled in by subclasses --

    def inputs(self) -> list:
        raise NotImplementedError

    def request(self, values: dict):
        raise NotImplementedError

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
        if self.advanced is not None:
            d["shift"] = self.advanced.shift
            d["max_sequence_length"] = self.advanced.max_sequence_length
        return d

    # -- wiring --

    def outputs(self) -> list:
        r = self.result
        return [r.progress, r.preview, r.gallery, r.info, r.paths, self.seed_row.last_seed,
                self.ctx.extra["header"]]

    def wire(self) -> None:
        r = self.result
        for trigger in (self.prompt_row.generate.click, self.prompt_row.prompt.submit):
            gpu_event(trigger, self.stream, set(self.inputs()), self.outputs(), api_visibility="private",
                      show_progress="full", show_progress_on=[r.preview])
        self.prompt_row.cancel.click(self._cancel, None, None, queue=False, api_visibility="private")

    def _cancel(self, request: gr.Request):
        n = self.ctx.jobs.cancel(request)
        if n:
            gr.Info("Cancelling: stopping after the current step; finished images are kept.")
        else:
            gr.Info("Nothing is running.")

    def stream(self, values: dict, request: gr.Request, progress=gr.Progress()):
        """The Generate button: progress bar, live previews, images as they finish."""
        from .context import status_html

        r = self.result
        req = self.request(values)
        paths: list[str] = []
        yield {r.progress: progress_html(0, req.steps or 0, 0, max(1, int(req.batch_count or 1)), None, 0),
               r.preview: gr.update(visible=True, value=None), r.info: ""}
        header = self.ctx.extra["header"]
        try:
            for u in self.ctx.jobs.stream(req, request, progress):
                if u.kind == "progress":
                    ev = u.event
                    out = {r.progress: progress_html(ev.step, ev.steps, ev.run, ev.runs, ev.eta_s, ev.fraction)}
                    if u.preview is not None:
                        out[r.preview] = u.preview
                    yield out
                elif u.kind == "image":
                    if u.image.path:
                        paths.append(u.image.path)
                        yield {r.gallery: list(paths), header: status_html(self.ctx.studio)}
                elif u.kind == "done":
                    res = u.result
                    notify(res.notes)
                    if res.cancelled:
                        gr.Info(f"Cancelled: kept {len(res.images)} finished image(s).")
                    if res.images:
                        self.ctx.remember(res.images[0].metadata.get("variant"))
                    paths = [i.path for i in res.images if i.path]
                    yield {
                        r.progress: "",
                        r.preview: gr.update(visible=False, value=None),
                        r.gallery: paths if paths else gr.update(),
                        r.info: res.info,
                        r.paths: paths,
                        self.seed_row.last_seed: res.seed if res.images else gr.update(),
                        header: status_html(self.ctx.studio),
                    }
        except gr.Error:
            yield {r.progress: "", r.preview: gr.update(visible=False, value=None),
                   header: status_html(self.ctx.studio)}
            raise

    # -- reuse parameters / model changes --

    def apply_fields(self, fields: dict) -> dict:
        """Updates filling this tab from studio fields (gallery metadata or read PNG info)."""
        out = {}
        comps = self.field_components()
        for name, comp in comps.items():
            value = fields.get(name)
            if value is None:
                continue
            if name in ("prompt", "negative_prompt"):
                out[comp] = str(value)
            else:
                try:
                    out[comp] = float(value) if name in ("guidance", "shift") else int(value)
                except (TypeError, ValueError):
                    continue
        w, h = fields.get("width"), fields.get("height")
        if self.size is not None and w and h:
            try:
                aspect, width, height, row = self.size.updates_for(int(w), int(h))
                out.update({self.size.aspect: aspect, self.size.width: width, self.size.height: height,
                            self.size.custom_row: row})
            except (TypeError, ValueError):
                pass
        if self.advanced is not None and self.advanced.slg.visible is not False and "slg" in fields:
            out[self.advanced.slg] = isinstance(fields.get("slg"), dict)
        return out

    def reuse_targets(self) -> list:
        comps = list(self.field_components().values())
        if self.size is not None:
            comps += [self.size.aspect, self.size.width, self.size.height, self.size.custom_row]
        if self.advanced is not None:
            comps.append(self.advanced.slg)
        return comps

    def variant_updates(self, variant_name: str | None) -> dict:
        """Recommended steps/guidance and the SLG offer for a newly chosen variant."""
        variant = VARIANTS.get(variant_name or "")
        if variant is None or self.sampling is None:
            return {}
        out = {self.sampling.steps: variant.steps, self.sampling.guidance: variant.guidance}
        if self.advanced is not None and self.mode == "txt2img":
            out[self.advanced.slg] = gr.update(visible=slg_offered(variant), value=variant.slg.recommended)
        return out

    def variant_targets(self) -> list:
        if self.sampling is None:
            return []
        t = [self.sampling.steps, self.sampling.guidance]
        if self.advanced is not None and self.mode == "txt2img":
            t.append(self.advanced.slg)
        return t
