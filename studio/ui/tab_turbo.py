"""Turbo: SD3.5 Large Turbo, 4 steps, no CFG — the fast sketchpad. Minimal controls."""

from __future__ import annotations

import gradio as gr

from ..catalog import TURBO_VARIANT, VARIANTS
from ..engine import GenerationRequest
from .controls import BatchGroup, PromptRow, ResultPanel, SamplingGroup, SeedRow, SizeGroup
from .generate import GenTab


class TurboTab(GenTab):
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
        self.prompt_row = PromptRow(p, negative=False)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320, elem_classes=["settings-col"]):
                self.size = SizeGroup(p, native_size=ctx.native_size)
                self.sampling = SamplingGroup(p, turbo.steps, turbo.guidance, guidance_visible=False,
                                              max_steps=12)
                self.seed_row = SeedRow(p)
                self.batch = BatchGroup(p)
            with gr.Column(scale=6, min_width=360):
                self.result = ResultPanel(p)

    def inputs(self) -> list:
        return [self.prompt_row.prompt, self.size.aspect, self.size.width, self.size.height,
                self.sampling.steps, self.seed_row.seed, self.batch.batch_count, self.batch.batch_size]

    def request(self, v: dict) -> GenerationRequest:
        width, height = self.size.size(v[self.size.aspect], v[self.size.width], v[self.size.height])
        return GenerationRequest(
            prompt=v[self.prompt_row.prompt],
            mode="turbo",
            width=width,
            height=height,
            steps=v[self.sampling.steps],
            seed=v[self.seed_row.seed] if v[self.seed_row.seed] is not None else -1,
            batch_count=v[self.batch.batch_count],
            batch_size=v[self.batch.batch_size],
        )


def create_ui(ctx) -> TurboTab:
    return TurboTab(ctx)
