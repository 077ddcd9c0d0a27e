"""Turbo: SD3.5 Large Turbo, 4 steps, no CFG — the fast sketchpad. Minimal controls."""

from __future__ import annotations

import gradio as gr

from studio.catalog import TURBO_VARIANT, VARIANTS

from .controls import BatchGroup, HiresGroup, LoraGroup, PromptRow, ResultPanel, SamplingGroup, SeedRow, SizeGroup
from .generate import GenTab


class TurboTab(GenTab):
    """The Turbo tab: SD3.5 Large Turbo, 4 steps, no CFG."""
    mode = "turbo"
    tab_id = "turbo"

    def __init__(self, ctx):
        super().__init__(ctx)
        turbo = VARIANTS[TURBO_VARIANT]
        p = self.tab_id
        gr.Markdown(
            f"**{turbo.label}** · {turbo.steps} steps · no CFG (no negative prompt). "
            "Switching here loads the Turbo model; the shared text encoders and VAE are reused.",
            elem_classes=["tab-note"],
        )
        self.prompt_row = PromptRow(p, negative=False, styles=ctx.studio.style_names())
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320, elem_classes=["settings-col"]):
                self.size = SizeGroup(p, native_size=ctx.native_size, limit=lambda: ctx.size_limit(self.mode))
                self.sampling = SamplingGroup(p, turbo.steps, turbo.guidance, guidance_visible=False)
                self.seed_row = SeedRow(p)
                self.batch = BatchGroup(p)
                self.hires = HiresGroup(p, self.mode)
                self.loras = LoraGroup(p)
            with gr.Column(scale=6, min_width=360):
                self.result = ResultPanel(p)

    def inputs(self) -> list:
        """The components whose values make the request."""
        return [self.prompt_row.prompt, self.size.aspect, self.size.width, self.size.height,
                self.sampling.steps, self.seed_row.seed, self.batch.batch_count, self.batch.batch_size]

def create_ui(ctx) -> TurboTab:
    """Build the Turbo tab."""
    return TurboTab(ctx)
