"""Text to image: prompt, size, sampling, seed, batch, hires fix, advanced (SLG, shift, T5)."""

from __future__ import annotations

import gradio as gr

from .controls import AdvancedGroup, BatchGroup, HiresGroup, PromptRow, ResultPanel, SamplingGroup, SeedRow, SizeGroup
from .generate import GenTab, slg_offered


class Txt2ImgTab(GenTab):
    """The txt2img tab: the shared groups plus Skip Layer Guidance."""
    mode = "txt2img"
    tab_id = "txt2img"
    offers_slg = True

    def __init__(self, ctx):
        super().__init__(ctx)
        variant = ctx.variant()
        p = self.tab_id
        self.prompt_row = PromptRow(p, styles=ctx.studio.style_names())
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320, elem_classes=["settings-col"]):
                self.size = SizeGroup(p, native_size=ctx.native_size, limit=lambda: ctx.size_limit(self.mode))
                self.sampling = SamplingGroup(p, variant.steps, variant.guidance)
                self.seed_row = SeedRow(p)
                self.batch = BatchGroup(p)
                self.hires = HiresGroup(p, self.mode)
                self.advanced = AdvancedGroup(p, slg_visible=slg_offered(variant),
                                              slg_value=variant.slg.recommended)
            with gr.Column(scale=6, min_width=360):
                self.result = ResultPanel(p)

    def inputs(self) -> list:
        """The components whose values make the request."""
        return [self.prompt_row.prompt, self.prompt_row.negative, self.size.aspect, self.size.width,
                self.size.height, self.sampling.steps, self.sampling.guidance, self.seed_row.seed,
                self.batch.batch_count, self.batch.batch_size, self.advanced.slg, self.advanced.shift,
                self.advanced.max_sequence_length]

    def fields(self, v: dict) -> dict:
        """The shared fields plus SLG, where the variant offers it."""
        return {**super().fields(v),
                "slg": bool(v[self.advanced.slg]) if slg_offered(self.ctx.variant()) else None}


def create_ui(ctx) -> Txt2ImgTab:
    """Build the text-to-image tab."""
    return Txt2ImgTab(ctx)
