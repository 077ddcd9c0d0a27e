"""Image to image: an init image (upload, paste, or "send to img2img") repainted by strength."""

from __future__ import annotations

import gradio as gr

from ..engine import GenerationRequest
from .controls import MATCH_INIT, AdvancedGroup, BatchGroup, PromptRow, ResultPanel, SamplingGroup, SeedRow, SizeGroup
from .generate import GenTab


class Img2ImgTab(GenTab):
    mode = "img2img"
    tab_id = "img2img"

    def __init__(self, ctx):
        super().__init__(ctx)
        variant = ctx.variant()
        p = self.tab_id
        self.prompt_row = PromptRow(p, placeholder="Describe what the result should show…")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320, elem_classes=["settings-col"]):
                self.init_image = gr.Image(
                    label="Init image", type="filepath", sources=["upload", "clipboard"], height=300,
                    elem_id=f"{p}-init",
                    image_mode=None,  # pass the file as uploaded: the engine handles alpha, 16-bit, CMYK, EXIF
                )
                self.strength = gr.Slider(
                    0, 1, value=0.6, step=0.01, label="Strength", elem_id=f"{p}-strength",
                    info="How much to repaint: 0.3–0.5 keeps the composition, 0.7–0.9 changes most of it.",
                )
                self.size = SizeGroup(p, native_label=MATCH_INIT)
                self.sampling = SamplingGroup(p, variant.steps, variant.guidance)
                self.seed_row = SeedRow(p)
                self.batch = BatchGroup(p)
                self.advanced = AdvancedGroup(p, slg_visible=False, slg_value=False, with_slg=False)
            with gr.Column(scale=6, min_width=360):
                self.result = ResultPanel(p)

    def inputs(self) -> list:
        return [self.init_image, self.strength, self.prompt_row.prompt, self.prompt_row.negative,
                self.size.aspect, self.size.width, self.size.height, self.sampling.steps,
                self.sampling.guidance, self.seed_row.seed, self.batch.batch_count, self.batch.batch_size,
                self.advanced.shift, self.advanced.max_sequence_length]

    def field_components(self) -> dict:
        d = super().field_components()
        d["strength"] = self.strength
        return d

    def request(self, v: dict) -> GenerationRequest:
        width, height = self.size.size(v[self.size.aspect], v[self.size.width], v[self.size.height])
        return GenerationRequest(
            prompt=v[self.prompt_row.prompt],
            negative_prompt=v[self.prompt_row.negative],
            mode="img2img",
            init_image=v[self.init_image],  # a path; the engine decodes it safely
            strength=v[self.strength],
            width=width,
            height=height,
            steps=v[self.sampling.steps],
            guidance=v[self.sampling.guidance],
            seed=v[self.seed_row.seed] if v[self.seed_row.seed] is not None else -1,
            batch_count=v[self.batch.batch_count],
            batch_size=v[self.batch.batch_size],
            shift=v[self.advanced.shift],
            max_sequence_length=v[self.advanced.max_sequence_length],
            variant=self.ctx.variant_for_request(),
        )


def create_ui(ctx) -> Img2ImgTab:
    return Img2ImgTab(ctx)
