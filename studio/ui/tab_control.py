"""Control: text to image steered by a ControlNet — a control image, its type, the preprocessor
with a preview of the map the ControlNet will read, conditioning scale, start and end — plus
all the txt2img controls. The ControlNet defaults to the catalog's for the model and type (in
demo mode the tiny one); its recommended scale, start and end fill the sliders when it is chosen.
ControlNet inpainting is on the API (/controlnet with image + mask)."""

from __future__ import annotations

import gradio as gr

from studio.control_catalog import CONTROL_TYPES, PREPROCESSORS
from studio.errors import ValidationError

from .components import ImagePath
from .controls import (AdvancedGroup, BatchGroup, HiresGroup, PromptRow, ResultPanel, SamplingGroup, SeedRow,
                       SizeGroup, slider)
from .generate import GenTab
from .jobs import call

DEFAULT_NET = "Catalog default"
AUTO_PREPROCESS = "Automatic"
TYPES = tuple(t for t in CONTROL_TYPES if t != "inpaint")  # inpaint: through the API, with a mask


class ControlTab(GenTab):
    """The Control tab: one ControlNet unit and the txt2img groups."""
    mode = "txt2img"
    tab_id = "control"

    def __init__(self, ctx):
        super().__init__(ctx)
        variant = ctx.variant()
        p = self.tab_id
        self.prompt_row = PromptRow(p, styles=ctx.studio.style_names())
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320, elem_classes=["settings-col"]):
                with gr.Group():
                    with gr.Row(equal_height=False):
                        self.control_image = ImagePath(label="Control image", sources=["upload", "clipboard"],
                                                       height=240, image_mode=None, elem_id=f"{p}-image")
                        self.preview = gr.Image(label="Control map (preview)", type="pil", interactive=False,
                                                height=240, buttons=[], elem_id=f"{p}-map")
                    with gr.Row():
                        self.control_type = gr.Dropdown(list(TYPES), value="canny", label="Control type",
                                                        elem_id=f"{p}-type")
                        self.preprocess = gr.Dropdown([AUTO_PREPROCESS, *PREPROCESSORS], value=AUTO_PREPROCESS,
                                                      label="Preprocessor",
                                                      info="none: the control image is the map already",
                                                      elem_id=f"{p}-preprocess")
                    self.controlnet = gr.Dropdown(self._net_choices("canny"), value=DEFAULT_NET, label="ControlNet",
                                                  elem_id=f"{p}-net")
                    with gr.Accordion("Preprocessor settings", open=False, elem_id=f"{p}-pre-settings"):
                        with gr.Row():
                            self.canny_low = slider("canny_low", elem_id=f"{p}-canny-low")
                            self.canny_high = slider("canny_high", elem_id=f"{p}-canny-high")
                        self.blur_radius = slider("blur_radius", elem_id=f"{p}-blur")
                    self.preview_btn = gr.Button("Preview the map", size="sm", elem_id=f"{p}-preview-btn")
                    with gr.Row():
                        scale = _slider_values(self._recommended("canny"))[0]
                        self.control_scale = slider("control_scale", value=scale, elem_id=f"{p}-scale")
                        self.control_start = slider("control_start", elem_id=f"{p}-start")
                        self.control_end = slider("control_end", elem_id=f"{p}-end")
                self.size = SizeGroup(p, native_size=ctx.native_size, limit=lambda: ctx.size_limit(self.mode))
                self.sampling = SamplingGroup(p, variant.steps, variant.guidance)
                self.seed_row = SeedRow(p)
                self.batch = BatchGroup(p)
                self.hires = HiresGroup(p, self.mode)
                # no SLG: diffusers' ControlNet pipelines have none
                self.advanced = AdvancedGroup(p, slg_visible=False, slg_value=False, with_slg=False)
            with gr.Column(scale=6, min_width=360):
                self.result = ResultPanel(p)

    # -- the catalog --

    def _nets(self, control_type: str) -> list[dict]:
        try:
            return self.ctx.studio.controlnets_for(self.ctx.variant().name, control_type)
        except ValidationError:  # an unknown variant: the catalog default only
            return []

    def _net_choices(self, control_type: str) -> list:
        return [DEFAULT_NET, *((n["label"], n["id"]) for n in self._nets(control_type) if n["id"])]

    def _recommended(self, control_type: str, net_id: str | None = None) -> dict:
        nets = self._nets(control_type)
        for n in nets:
            if net_id in (None, "", DEFAULT_NET) or n["id"] == net_id:
                return n
        return {}

    # -- the request --

    def control_components(self) -> list:
        """The unit's inputs."""
        return [self.control_image, self.control_type, self.preprocess, self.controlnet, self.canny_low,
                self.canny_high, self.blur_radius, self.control_scale, self.control_start, self.control_end]

    def inputs(self) -> list:
        """The components whose values make the request."""
        return [self.prompt_row.prompt, self.prompt_row.negative, self.size.aspect, self.size.width,
                self.size.height, self.sampling.steps, self.sampling.guidance, self.seed_row.seed,
                self.batch.batch_count, self.batch.batch_size, self.advanced.shift,
                self.advanced.max_sequence_length, *self.control_components()]

    def fields(self, v: dict) -> dict:
        """The txt2img fields plus the ControlNet unit."""
        net = v[self.controlnet]
        pre = v[self.preprocess]
        return {**super().fields(v), "slg": False,
                "control_image": v[self.control_image], "control_type": v[self.control_type],
                "controlnet": None if net in (None, "", DEFAULT_NET) else net,
                "preprocess": None if pre in (None, "", AUTO_PREPROCESS) else pre,
                "canny_low": v[self.canny_low], "canny_high": v[self.canny_high],
                "blur_radius": v[self.blur_radius], "control_scale": v[self.control_scale],
                "control_start": v[self.control_start], "control_end": v[self.control_end]}

    def field_components(self) -> dict:
        """The shared fields plus the unit's settings (reuse parameters)."""
        return {**super().field_components(), "control_type": self.control_type, "canny_low": self.canny_low,
                "canny_high": self.canny_high, "blur_radius": self.blur_radius,
                "control_scale": self.control_scale, "control_start": self.control_start,
                "control_end": self.control_end}

    def apply_fields(self, fields: dict, inputs: dict | None = None) -> dict:
        """Reuse: the first ControlNet unit's settings and its stored control image."""
        units = fields.get("controls") or []
        unit = units[0] if units and isinstance(units[0], dict) else {}
        flat = {**fields, **{k: v for k, v in unit.items() if k != "control_image"}}
        out = super().apply_fields(flat, inputs)
        if unit.get("preprocess") in PREPROCESSORS:
            out[self.preprocess] = unit["preprocess"]
        if unit.get("controlnet"):
            out[self.controlnet] = gr.update(choices=self._net_choices(unit.get("control_type") or "canny"),
                                             value=unit["controlnet"])
        images = (inputs or {}).get("control_images") or []
        if images and images[0]:
            out[self.control_image] = images[0]  # stored by content, found by the gallery id
        return out

    def reuse_targets(self) -> list:
        """The shared targets plus the unit's image, preprocessor and ControlNet."""
        return [*super().reuse_targets(), self.control_image, self.preprocess, self.controlnet]

    def image_checks(self) -> list:
        """The control image is checked on upload, as init images are."""
        return [(self.control_image, "control_image")]

    # -- wiring --

    def wire(self) -> None:
        """Generate (the shared handler), the preview, and the catalog's recommendations."""
        super().wire()
        private = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")
        studio = self.ctx.studio

        def on_type(control_type):
            return (gr.update(choices=self._net_choices(control_type), value=DEFAULT_NET),
                    *_slider_values(self._recommended(control_type)))

        def on_net(control_type, net):
            rec = self._recommended(control_type, net)
            return _slider_values(rec) if rec else (gr.update(),) * 3

        recs = [self.control_scale, self.control_start, self.control_end]
        self.control_type.input(on_type, self.control_type, [self.controlnet, *recs], **private)
        self.controlnet.input(on_net, [self.control_type, self.controlnet], recs, **private)

        def preview(image, control_type, pre, net, low, high, radius, aspect, width, height):
            w, h = self.size.size(aspect, width, height)
            return call(studio.control_preview, image, control_type,
                        None if net in (None, "", DEFAULT_NET) else net,
                        None if pre in (None, "", AUTO_PREPROCESS) else pre, low, high, radius, None, None, w, h,
                        self.ctx.variant().name)

        args = [self.control_image, self.control_type, self.preprocess, self.controlnet, self.canny_low,
                self.canny_high, self.blur_radius, self.size.aspect, self.size.width, self.size.height]
        # queued: a depth preprocessor may run a model (one at a time), never under the GPU lock
        self.preview_btn.click(preview, args, self.preview, api_visibility="private")


def _slider_values(rec: dict) -> tuple[float, float, float]:
    """A catalog entry's recommended (weight, start, end); an unset one is the whole range at 1."""
    return rec.get("scale") or 1.0, rec.get("start") or 0.0, rec.get("end") or 1.0


def create_ui(ctx) -> ControlTab:
    """Build the Control tab."""
    return ControlTab(ctx)
