"""Image to image: an init image (upload, paste, or "send to img2img") repainted by strength."""

from __future__ import annotations

import gradio as gr

from .components import ImagePath
from .controls import MATCH_INIT, AdvancedGroup, BatchGroup, PromptRow, ResultPanel, SamplingGroup, SeedRow, SizeGroup, slider
from .generate import GenTab


class Img2ImgTab(GenTab):
    """The img2img tab: an init image, strength, and the shared groups."""
    mode = "img2img"
    tab_id = "img2img"

    def __init__(self, ctx):
        super().__init__(ctx)
        variant = ctx.variant()
        p = self.tab_id
        self.prompt_row = PromptRow(p, placeholder="Describe what the result should show…", styles=ctx.studio.style_names())
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320, elem_classes=["settings-col"]):
                self.init_image = ImagePath(
                    label="Init image", sources=["upload", "clipboard"], height=300,
                    elem_id=f"{p}-init",
                    image_mode=None,  # pass the file as uploaded: the engine handles alpha, 16-bit, CMYK, EXIF
                )
                self.strength = slider(
                    "strength", "img2img", elem_id=f"{p}-strength",
                    info="How much to repaint: 0.3–0.5 keeps the composition, 0.7–0.9 changes most of it.",
                )
                self.size = SizeGroup(p, native_label=MATCH_INIT, limit=lambda: ctx.size_limit(self.mode))
                self.sampling = SamplingGroup(p, variant.steps, variant.guidance)
                self.seed_row = SeedRow(p)
                self.batch = BatchGroup(p)
                self.advanced = AdvancedGroup(p, slg_visible=False, slg_value=False, with_slg=False)
            with gr.Column(scale=6, min_width=360):
                self.result = ResultPanel(p)

    def inputs(self) -> list:
        """The components whose values make the request."""
        return [self.init_image, self.strength, self.prompt_row.prompt, self.prompt_row.negative,
                self.size.aspect, self.size.width, self.size.height, self.sampling.steps,
                self.sampling.guidance, self.seed_row.seed, self.batch.batch_count, self.batch.batch_size,
                self.advanced.shift, self.advanced.max_sequence_length]

    def field_components(self) -> dict:
        """The shared fields plus strength."""
        d = super().field_components()
        d["strength"] = self.strength
        return d

    def fields(self, v: dict) -> dict:
        """The shared fields plus the init image (a path, checked by the engine) and strength."""
        return {**super().fields(v), "init_image": v[self.init_image], "strength": v[self.strength]}

    def apply_fields(self, fields: dict, inputs: dict | None = None) -> dict:
        """The shared reuse updates plus the stored init image."""
        out = super().apply_fields(fields, inputs)
        if (inputs or {}).get("init_image"):
            out[self.init_image] = inputs["init_image"]  # the stored init image, by the gallery id
        return out

    def image_checks(self) -> list:
        """The init image is checked on upload."""
        return [(self.init_image, "init_image")]

    def reuse_targets(self) -> list:
        """The shared targets plus the init image."""
        return [*super().reuse_targets(), self.init_image]


def create_ui(ctx) -> Img2ImgTab:
    """Build the img2img tab."""
    return Img2ImgTab(ctx)
